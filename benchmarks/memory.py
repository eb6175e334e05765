"""Peak memory and time of a conversion against the widest layer and the calibration size, on a
VGG-16-shaped ImageNet classifier (13 3x3 convs up to 512 channels, FC 512*s*s -> 4096 -> 4096 ->
1000; 138M parameters at 224^2), calibrated on crops of real photos (models/photos). VGG-16 is the
model whose 25088-wide first FC layer once took 4.7 GiB of statistics alone and was killed at 24 GB.

    .venv/bin/python benchmarks/memory.py [--runs 224:200,224:50,160:200,112:200] [--ulimit-gb 6]

Each conversion is the real CLI at default options (eps 0.01) in a process of its own, its peak
RSS read by /usr/bin/time. The last row runs 224^2 / 200 samples under `ulimit -v` of --ulimit-gb:
it must end in one error line naming --max-memory, or succeed with --max-memory set to fit.

The weights are PyTorch's default initialisation, not trained ones (no trained VGG-16 ships on
PyPI): the memory and time depend on the layers' shapes and the data, not on the weights, but the
compression ratio of an untrained network means nothing, so this table does not show one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from data import photo_crops  # noqa: E402

CLI = str(Path(sys.executable).with_name("onnx-lowrank"))
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(size: int, path: Path) -> int:
    """Export a VGG-16-shaped classifier for size x size inputs; returns its first FC's width."""
    import torch
    from torch import nn

    layers, c = [], 3
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    side = size // 32
    torch.manual_seed(0)
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * side * side, 4096), nn.ReLU(),
                        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)).eval()
    torch.onnx.export(net, torch.zeros(1, 3, size, size), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    return 512 * side * side


def convert(src: Path, calib: Path, out: Path, ulimit_kb: int | None = None, extra: tuple = ()) -> dict:
    report = out.with_suffix(".json")
    cmd = [CLI, "convert", str(src), str(out), "--eps", "0.01", "--calib", str(calib), "--report", str(report), *extra]
    rss_file = out.with_suffix(".rss")
    shell = (f"ulimit -v {ulimit_kb}; " if ulimit_kb else "") + " ".join(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + [f"'{c}'" for c in cmd])
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    result = {"rc": done.returncode, "seconds": seconds, "error": errors[0] if errors else "",
              "peak_mb": int(rss_file.read_text().split()[-1]) / 1024 if rss_file.exists() else float("nan")}
    if done.returncode == 0:
        r = json.loads(report.read_text())
        result.update(stats_mb=r["memory"]["statistics_bytes"] / 2**20, batch=r["calibration"]["run_batch"],
                      timings=r["timings"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="224:200,224:50,160:200,112:200", help="size:samples, ...")
    parser.add_argument("--ulimit-gb", type=float, default=6.0)
    args = parser.parse_args()
    runs = [tuple(int(v) for v in r.split(":")) for r in args.runs.split(",")]
    table = Table(title="peak RSS of a conversion (default options, eps 0.01) of a VGG-16-shaped classifier")
    for col in ("input", "widest layer (input width)", "samples", "limit", "result", "run batch",
                "statistics", "peak RSS", "time", "stages (s)"):
        table.add_column(col, overflow="fold")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        rows = [(size, n, None, ()) for size, n in runs]
        rows += [(224, 200, int(args.ulimit_gb * 2**20), ()),
                 (224, 200, int(args.ulimit_gb * 2**20), ("--max-memory", f"{args.ulimit_gb / 2:g}G"))]
        for size, n, ulimit_kb, extra in rows:
            if size not in models:
                models[size] = (tmp / f"vgg16_{size}.onnx", vgg16(size, tmp / f"vgg16_{size}.onnx"))
            src, width = models[size]
            calib = tmp / f"calib_{size}_{n}.npz"
            if not calib.exists():
                crops = photo_crops(-(-n // len(list((ROOT / "models" / "photos").glob("*.png")))), 0, size)
                np.savez(calib, x=crops[:n])
            r = convert(src, calib, tmp / f"out_{size}_{n}.onnx", ulimit_kb, extra)
            limit = (f"ulimit -v {args.ulimit_gb:g} GB" if ulimit_kb else "none") + (f", {' '.join(extra)}" if extra else "")
            outcome = "converted" if r["rc"] == 0 else f"exit {r['rc']}: {r['error'] or 'no error line'}"
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("timings", {}).items())
            table.add_row(f"{size}x{size}", f"FC {width} -> 4096", str(n), limit, outcome, str(r.get("batch", "")),
                          f"{r['stats_mb']:,.0f} MB" if "stats_mb" in r else "", f"{r['peak_mb']:,.0f} MB",
                          f"{r['seconds']:.0f} s", stages)
            print(f"{size} {n} {limit}: {outcome}, peak {r['peak_mb']:,.0f} MB, {r['seconds']:.0f} s", flush=True)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
