"""Deployment speed, measured in one run on this machine:

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="latency,time,memory")
    args = parser.parse_args()
    parts = args.parts.split(",")
    for path in (RESNET, MOBILENET):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make bench-models` first")
    console = Console(width=220)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = setups(folder)
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
