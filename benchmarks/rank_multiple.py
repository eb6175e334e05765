"""What rounding ranks to multiples does to a whole model: speed, compression and the drop on
unseen data, float and int8.

    .venv/bin/python benchmarks/rank_multiple.py [--models mnist_cnn,resnet18_mnist] [--multiples 1,8,16]
    (make bench-models first: it builds the ResNet)

Each model converted at eps 0.005 on models/mnist_calib.npz (1000 training images, labels) with
each `--rank-multiple`, in float and with `--quantize int8`; judged on MNIST test[2000:] (8000
digits no conversion saw). Latency: onnxruntime CPU, every version of a model in turn
(latency.interleaved), at 1 and 2 threads, batch 1 and 32, medians, against the original in
float. The default is 1 in float and 8 with `--quantize int8` (config.INT8_RANK_MULTIPLE).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from data import MODELS, mnist
from rich.console import Console
from rich.table import Table

from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress_file
from onnx_lowrank.runtime.latency import interleaved
from onnx_lowrank.runtime.sessions import predict, session

EPS = 0.005
CALIB = MODELS / "mnist_calib.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist_cnn,resnet18_mnist")
    parser.add_argument("--multiples", default="1,8,16")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-bias notes
    warnings.simplefilter("ignore")
    _, _, (x, y) = mnist()
    images, labels = x[2000:], y[2000:]
    multiples = [int(m) for m in args.multiples.split(",")]
    table = Table(title=f"--rank-multiple at eps {EPS}: unseen = MNIST test[2000:] ({len(labels)} digits); "
                        "speed against the original in float")
    for col in ("model", "precision", "--rank-multiple", "MACs", "calibration drop", "unseen drop",
                "within eps", "1 thread b1 / b32", "2 threads b1 / b32"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            src = MODELS / f"{name}.onnx"
            versions, reports = {("original", "", ""): onnx.load(str(src))}, {}
            for quantize in (None, "int8"):
                for m in multiples:
                    key = (quantize or "float", str(m), name)
                    out = Path(tmp) / f"{name}.{key[0]}.{m}.onnx"
                    reports[key] = compress_file(src, out, CompressConfig(eps=EPS, quantize=quantize, rank_multiple=m),
                                                 str(CALIB), "labels")
                    versions[key] = onnx.load(str(out))
            input_name = versions[("original", "", "")].graph.input[0].name
            unseen = CalibrationSet({input_name: images})
            accuracy = {k: float(np.mean(predict(m, unseen, 256)[0].argmax(1) == labels)) for k, m in versions.items()}
            ratios = {}
            for threads in (1, 2):
                sessions = [session(m, "deploy", threads) for m in versions.values()]
                for batch in (1, 32):
                    times = interleaved(sessions, {input_name: images[:batch]}, min_runs=40, min_seconds=3.0)
                    medians = [float(np.median(t)) for t in times]
                    for k, t in zip(versions, medians):
                        ratios[k, threads, batch] = medians[0] / t
            for k in versions:
                if k[0] == "original":
                    continue
                drop = accuracy[("original", "", "")] - accuracy[k]
                r = reports[k]
                table.add_row(name, k[0], k[1], f"{r.mac_ratio:.2f}x", f"{r.drop:.4f}", f"{drop:.4f}",
                              "yes" if drop <= EPS + 1 / len(labels) else "NO",
                              *(f"{ratios[k, t, 1]:.2f}x / {ratios[k, t, 32]:.2f}x" for t in (1, 2)))
            table.add_section()
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
