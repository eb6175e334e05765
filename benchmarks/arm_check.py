"""Same model, same inputs, x86-64 vs aarch64 onnxruntime: do the outputs agree? Driven by
benchmarks/arm.sh, which runs the three steps in order:

    prepare MODEL WORKDIR [--data NPZ] [--batch N] [--seed S]   (x86-64, the project's .venv)
        Copies the model (and any external-data files) to WORKDIR/model.onnx, builds a deterministic
        input batch (arrays of the same name from --data NPZ, else seeded random data shaped by the
        model's inputs, dynamic dims set to --batch for the first axis and --dim-default elsewhere),
        saves it to WORKDIR/inputs.npz, runs onnxruntime's CPU provider on it and saves
        WORKDIR/x86_out.npz and WORKDIR/x86_meta.json.
    run WORKDIR                                                  (aarch64, inside the emulated root)
        Loads WORKDIR/model.onnx and WORKDIR/inputs.npz, runs onnxruntime, saves WORKDIR/arm_out.npz and
        WORKDIR/arm_meta.json, and prints platform.machine() and onnxruntime's version. Needs only
        numpy and onnxruntime: not onnx, not the project's package.
    compare WORKDIR                                              (x86-64)
        Per output: max |x86|, max abs diff, max rel diff, top-1 agreement for 2-D outputs. Passes
        if every output has max abs diff <= 1e-4 * (1 + max |x86 output|) and the arm side really
        was aarch64. Exit 0 on pass, 1 on fail.

Both sides run with one intra-op thread, so each side is deterministic on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

RTOL_ABS = 1e-4  # tolerance: max abs diff <= RTOL_ABS * (1 + max |x86 output|)

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session(model: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def run_model(model: Path, inputs: dict, threads: int) -> tuple[dict, float]:
    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    start = time.perf_counter()
    values = sess.run(names, inputs)
    return dict(zip(names, values)), time.perf_counter() - start


def meta(seconds: float) -> dict:
    return {"machine": platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "seconds": seconds}


def copy_model(model: Path, work: Path) -> None:
    """model.onnx plus any external-data files it names, at the same relative paths."""
    shutil.copyfile(model, work / "model.onnx")
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            target = work / location
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copyfile(model.parent / location, target)


def build_inputs(model: Path, data: Path | None, batch: int, dim_default: int, seed: int) -> dict:
    sess = session(model, 1)
    rng = np.random.default_rng(seed)
    inputs = {}
    stored = np.load(data) if data else None
    for spec in sess.get_inputs():
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None:
            raise SystemExit(f"arm_check: input {spec.name!r} has type {spec.type}, not supported here")
        if stored is not None and spec.name in stored.files:
            value = stored[spec.name][:batch].astype(dtype)
        else:
            shape = [d if isinstance(d, int) and d >= 0 else (batch if axis == 0 else dim_default)
                     for axis, d in enumerate(spec.shape)]
            if np.issubdtype(dtype, np.floating):
                value = rng.standard_normal(shape).astype(dtype)
            elif dtype is np.bool_:
                value = rng.integers(0, 2, shape).astype(dtype)
            else:
                value = rng.integers(0, 10, shape).astype(dtype)
        inputs[spec.name] = value
    return inputs


def prepare(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    copy_model(Path(args.model), work)
    inputs = build_inputs(work / "model.onnx", Path(args.data) if args.data else None,
                          args.batch, args.dim_default, args.seed)
    np.savez(work / "inputs.npz", **inputs)
    outputs, seconds = run_model(work / "model.onnx", inputs, args.threads)
    np.savez(work / "x86_out.npz", **outputs)
    (work / "x86_meta.json").write_text(json.dumps(meta(seconds)))
    source = f"first {args.batch} rows of {args.data}" if args.data else f"seeded random (seed {args.seed})"
    print(f"inputs ({source}): " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in inputs.items()))
    print(f"x86-64 run: onnxruntime {ort.__version__}, {seconds * 1e3:.1f} ms")


def run(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    with np.load(work / "inputs.npz") as stored:
        inputs = {k: stored[k] for k in stored.files}
    outputs, seconds = run_model(work / "model.onnx", inputs, args.threads)
    np.savez(work / "arm_out.npz", **outputs)
    info = meta(seconds)
    info["qemu_cpu"] = os.environ.get("QEMU_CPU", "qemu's default")
    (work / "arm_meta.json").write_text(json.dumps(info))
    print(f"arm side: platform.machine() = {info['machine']}, python {info['python']}, "
          f"numpy {info['numpy']}, onnxruntime {info['onnxruntime']} {info['providers']}, "
          f"emulated CPU model {info['qemu_cpu']}, "
          f"{seconds * 1e3:.1f} ms (emulated: meaningless)")


def compare(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    x86_meta = json.loads((work / "x86_meta.json").read_text())
    arm_meta = json.loads((work / "arm_meta.json").read_text())
    failures = []
    if arm_meta["machine"] != "aarch64":
        failures.append(f"arm side ran on {arm_meta['machine']!r}, not aarch64")
    print(f"onnxruntime: x86-64 {x86_meta['onnxruntime']} ({x86_meta['machine']}), "
          f"aarch64 {arm_meta['onnxruntime']} ({arm_meta['machine']})")
    if x86_meta["onnxruntime"] != arm_meta["onnxruntime"]:
        print("note: onnxruntime versions differ between the two sides")
    print(f"tolerance: max abs diff <= {RTOL_ABS:g} * (1 + max|x86|); "
          "rel diff = |arm - x86| / max(|x86|, 1e-6), elementwise")
    rows = [("output", "shape", "max|x86|", "max abs diff", "tolerance", "max rel diff",
             "top-1 agree", "identical", "result")]
    with np.load(work / "x86_out.npz") as a, np.load(work / "arm_out.npz") as b:
        for name in a.files:
            x = a[name]
            if name not in b.files:
                failures.append(f"{name}: missing on the arm side")
                continue
            y = b[name]
            if x.shape != y.shape or x.dtype != y.dtype:
                failures.append(f"{name}: x86 {x.dtype}{x.shape} vs arm {y.dtype}{y.shape}")
                continue
            xf, yf = x.astype(np.float64), y.astype(np.float64)
            same_nonfinite = np.array_equal(~np.isfinite(xf), ~np.isfinite(yf)) and \
                np.array_equal(xf[~np.isfinite(xf)], yf[~np.isfinite(yf)])
            finite = np.isfinite(xf)
            diff = np.abs(xf - yf)[finite] if same_nonfinite else np.array([np.inf])
            max_x = float(np.abs(xf[finite]).max()) if finite.any() else 0.0
            max_abs = float(diff.max()) if diff.size else 0.0
            rel = diff / np.maximum(np.abs(xf[finite]), 1e-6) if same_nonfinite else diff
            max_rel = float(rel.max()) if rel.size else 0.0
            tol = RTOL_ABS * (1 + max_x)
            top1 = "-"
            if x.ndim == 2 and x.shape[1] > 1:
                agree = int(np.sum(x.argmax(1) == y.argmax(1)))
                top1 = f"{agree}/{x.shape[0]}"
            identical = np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.floating))
            ok = max_abs <= tol
            if not ok:
                failures.append(f"{name}: max abs diff {max_abs:.3g} > tolerance {tol:.3g}")
            rows.append((name, "x".join(map(str, x.shape)), f"{max_x:.4g}", f"{max_abs:.3g}",
                         f"{tol:.3g}", f"{max_rel:.3g}", top1,
                         "yes" if identical else f"no ({int(np.sum(x != y))}/{x.size} differ)",
                         "pass" if ok else "FAIL"))
        for name in b.files:
            if name not in a.files:
                failures.append(f"{name}: only on the arm side")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("RESULT: " + ("FAIL" if failures else "PASS") + " (aarch64 outputs vs x86-64 outputs)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare", help="x86: copy model, build inputs, run, save outputs")
    p.add_argument("model")
    p.add_argument("workdir")
    p.add_argument("--data", help="npz whose arrays named like the model's inputs are used (first --batch rows)")
    p.add_argument("--batch", type=int, default=4, help="first-axis size for dynamic dims / rows of --data")
    p.add_argument("--dim-default", type=int, default=32, help="size of other dynamic dims")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("run", help="aarch64: run the model on the saved inputs")
    r.add_argument("workdir")
    r.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare", help="x86: compare the two sides' outputs")
    c.add_argument("workdir")
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(args)
    elif args.mode == "run":
        run(args)
    else:
        return compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
