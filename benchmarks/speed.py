"""Deployment speed, measured in one run on this machine:

0. How much of the MAC ratio becomes time (`--parts speedup`): a VGG-16-shaped classifier at
   112^2 (PyTorch's default initialisation: speed does not depend on the weights' values) with
   every layer at fixed fractions 0.5 / 0.35 / 0.25 of its cost (`--select rank --ratio R`), and
   the three trained MNIST models (the default model, the digit CNN, the ResNet-18-shaped one) at
   eps 0.005 (calibrated on models/mnist_calib.npz, their drop measured on the 10000 test digits),
   each converted three ways: MAC cost with ranks any width (`--rank-multiple 1`), the default
   (MAC cost, ranks in the widths the kernels run fast: runtime/widths.py), and `--cost latency`.
   All versions of a model timed interleaved (`onnx-lowrank bench`) at batch 1 and 32, with 1 and
   2 onnxruntime threads: the speed-up and its share of the MAC ratio.
1. `--cost latency` on MobileNetV2 (real photos, eps 0.01 agreement), on a ResNet-18-shaped CNN
   trained here on MNIST (eps 0.005 accuracy) and on the default model (MNIST, eps 0.005):
   onnxruntime CPU latency of the original and the compressed model at batch 1 and 32 (run in
   turn, `onnx-lowrank bench`), the speedup against the MAC reduction, and per rewritten layer
   its latency before and after (micro-models).
2. Conversion wall time per stage with the default options: MobileNetV2 at eps 0.01, and the
   ResNet-18-shaped model with 500 calibration samples.
3. Peak memory (max RSS) of a conversion of the largest model with 100 and with 2000
   calibration samples, each in its own process.

    .venv/bin/python benchmarks/speed.py      (make bench-models first: it builds the models)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from data import MODELS, mnist, photo_crops
from rich.console import Console
from rich.table import Table

from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress_file
from onnx_lowrank.tools.bench import bench

RESNET = MODELS / "resnet18_mnist.onnx"
WAYS = {"MAC cost": dict(rank_multiple=1), "default": {}, "latency cost": dict(cost="latency")}
VGG_SIZE, VGG_RATIOS = 112, (0.5, 0.35, 0.25)
MOBILENET = MODELS / "mobilenet_v2.onnx"


def setups(folder: Path) -> dict[str, dict]:
    _, _, (x, y) = mnist()
    np.savez(folder / "mnist500.npz", image=x[:500], labels=y[:500])
    np.savez(folder / "photos.npz", input=photo_crops(16, seed=0))
    return {
        "mobilenet_v2": dict(path=MOBILENET, calib=folder / "photos.npz", labels=None, eps=0.01),
        "resnet18_mnist": dict(path=RESNET, calib=folder / "mnist500.npz", labels="labels", eps=0.005),
        "mnist_cnn": dict(path=MODELS / "mnist_cnn.onnx", calib=MODELS / "mnist_calib.npz", labels="labels",
                          eps=0.005),
    }
TIMED = ("mobilenet_v2", "resnet18_mnist")  # the conversion times the issue sets targets for


def convert(setup: dict, out: Path, **options):
    config = CompressConfig(eps=setup["eps"], **options)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_file(setup["path"], out, config, str(setup["calib"]), setup["labels"])
    return report, time.perf_counter() - start


def peak_rss_mb(setup: dict, samples: int, folder: Path) -> tuple[float, float]:
    """Max RSS (MB) and wall time of one conversion in a fresh process."""
    _, _, (x, y) = mnist()
    idx = np.arange(samples) % len(x)
    calib = folder / f"mem{samples}.npz"
    np.savez(calib, image=x[idx], labels=y[idx])
    code = (
        "import resource, sys, warnings\n"
        "from onnx_lowrank.config import CompressConfig\n"
        "from onnx_lowrank.pipeline import compress_file\n"
        "warnings.simplefilter('ignore')\n"
        f"compress_file({str(setup['path'])!r}, {str(folder / 'mem.onnx')!r}, CompressConfig(eps={setup['eps']}), "
        f"{str(calib)!r}, 'labels')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024, time.perf_counter() - start


def speedups(folder: Path, console: Console) -> Table:
    """Part 0: every way of each model against its original, timed together."""
    from memory import vgg16

    table = Table(title="speed-up against the MAC ratio: onnxruntime CPU, all versions of a model timed interleaved")
    for col in ("model", "way", "MAC ratio", "drop", "b1 1 thr", "b32 1 thr", "b1 2 thr", "b32 2 thr",
                "share of MAC ratio (min - max)"):
        table.add_column(col, justify="right")
    vgg = folder / "vgg16.onnx"
    vgg16(VGG_SIZE, vgg)
    np.savez(folder / "vgg_calib.npz", x=photo_crops(8, seed=0, size=VGG_SIZE))
    mnist_test = str(MODELS / "mnist_test.npz")
    models = {"vgg16_112": (vgg, [dict(eps=0.01, select="rank", ratio=r) for r in VGG_RATIOS], folder / "vgg_calib.npz",
                            None, None)}
    for name, path in (("mnist_cnn", MODELS / "mnist_cnn.onnx"), ("digit_cnn", MODELS / "digit_cnn.onnx"),
                       ("resnet18_mnist", RESNET)):
        models[name] = (path, [dict(eps=0.005)], MODELS / "mnist_calib.npz", "labels", mnist_test)
    for name, (src, settings, calib, labels, judge) in models.items():
        outs, rows = [], []
        for setting in settings:
            for way, options in WAYS.items():
                out = folder / f"{name}_{len(outs)}.onnx"
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = compress_file(src, out, CompressConfig(**setting, **options), str(calib), labels)
                label = way if "ratio" not in setting else f"{way}, ratio {setting['ratio']}"
                console.print(f"{name} {label}: {report.mac_ratio:.2f}x MACs, ranks in multiples of "
                              f"{report.rank_multiple}, converted in {time.perf_counter() - start:.0f}s",
                              highlight=False)
                outs.append(out)
                rows.append((label, report))
        results = [bench(src, *outs, batches=(1, 32), threads=t, calibration=judge,
                         labels="labels" if judge else None) for t in (1, 2)]
        for k, (label, report) in enumerate(rows):
            speed = [r.latency[b].speedup[k] for r in results for b in (0, 1)]  # t1 b1, t1 b32, t2 b1, t2 b32
            share = [v / report.mac_ratio for v in speed]
            drop = f"{results[0].drop[k]:.4f}" if judge else "-"
            table.add_row(name, label, f"{report.mac_ratio:.2f}x", drop, *(f"{v:.2f}x" for v in
                          (speed[0], speed[1], speed[2], speed[3])), f"{min(share):.2f} - {max(share):.2f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="speedup,latency,time,memory")
    args = parser.parse_args()
    parts = args.parts.split(",")
    for path in (RESNET, MOBILENET):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make bench-models` first")
    console = Console(width=220)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = setups(folder)
        if "speedup" in parts:
            console.print(speedups(folder, console))
        if "latency" in parts:
            whole = Table(title="--cost latency: onnxruntime CPU latency, original vs compressed, run in turn")
            for col in ("model", "eps", "held-out drop", "MAC ratio", "batch", "original ms", "compressed ms",
                        "speedup", "speedup / MAC ratio"):
                whole.add_column(col, justify="right")
            per_layer = Table(title="--cost latency: rewritten layers, each timed alone at its input shape, batch 1")
            for col in ("model", "layer", "method", "ranks", "MACs ratio", "before ms", "after ms", "speedup"):
                per_layer.add_column(col, justify="right")
            for name, setup in runs.items():
                out = folder / f"{name}_latency.onnx"
                report, seconds = convert(setup, out, cost="latency")
                result = bench(setup["path"], out, batches=(1, 32), calibration=str(setup["calib"]), labels=setup["labels"])
                for lat in result.latency:
                    whole.add_row(name, str(setup["eps"]), f"{report.drop:.4f}", f"{report.mac_ratio:.2f}x",
                                  str(lat.batch), f"{1e3 * lat.median[0]:.2f}", f"{1e3 * lat.median[1]:.2f}",
                                  f"{lat.speedup[0]:.2f}x", f"{lat.speedup[0] / report.mac_ratio:.2f}")
                for r in report.layers:
                    if r.method is not None:
                        per_layer.add_row(name, r.name, r.method, ",".join(map(str, r.ranks)),
                                          f"{r.macs_before / r.macs_after:.2f}x", f"{1e3 * r.latency_before:.3f}",
                                          f"{1e3 * r.latency_after:.3f}", f"{r.latency_before / r.latency_after:.2f}x")
                kept = sum(r.method is None for r in report.layers)
                console.print(f"{name}: --cost latency converted in {seconds:.0f}s; {len(report.layers) - kept} "
                              f"layers rewritten, {kept} kept, {len(report.skipped)} skipped", highlight=False)
            console.print(whole)
            console.print(per_layer)
        if "time" in parts:
            table = Table(title="conversion wall time, default options (no fine-tuning)")
            for col in ("model", "params", "calibration", "eps", "MAC ratio", "held-out drop", "load", "calibrate",
                        "decompose", "select", "verify", "total"):
                table.add_column(col, justify="right")
            for name in TIMED:
                setup = runs[name]
                report, seconds = convert(setup, folder / f"{name}.onnx")
                t = report.timings
                table.add_row(name, f"{report.params_before / 1e6:.1f}M", str(report.calibration["samples"]),
                              str(setup["eps"]), f"{report.mac_ratio:.2f}x", f"{report.drop:.4f}",
                              *(f"{t.get(k, 0):.1f}s" for k in ("load", "calibrate", "decompose", "select", "verify")),
                              f"{seconds:.1f}s")
            console.print(table)
        if "memory" in parts:
            table = Table(title="peak memory of a conversion (max RSS, own process), resnet18_mnist")
            for col in ("calibration samples", "max RSS", "wall time"):
                table.add_column(col, justify="right")
            for samples in (100, 2000):
                rss, seconds = peak_rss_mb(runs["resnet18_mnist"], samples, folder)
                table.add_row(str(samples), f"{rss:.0f} MB", f"{seconds:.0f}s")
            console.print(table)


if __name__ == "__main__":
    main()
