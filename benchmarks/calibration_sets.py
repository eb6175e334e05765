"""How much the result depends on which calibration images it was given: the default MNIST model
and the digit CNN at eps 0.005 (accuracy, labels), each calibrated on five different 1000-image
sets, judged on MNIST test images none of them saw.

    .venv/bin/python benchmarks/calibration_sets.py [--models mnist_cnn,digit_cnn] [--eps 0.005] [--size 1000]
                                                   [--no-baseline]

Sets: training[:size] and test[0:size], test[size:2 size], ... test[3 size:4 size] (the sets the
issue measured); unseen: test[5000:] (5000 images no set holds). Each conversion is compress()
with the default options in this process. Columns: the original's accuracy on the set (and, in
the spread row, on the unseen images), the MAC ratio, the drop the converter measured on the
whole set (of the written model, and cross-fitted: compensate.py) and on its held-out part
alone, how far the check stepped back, and the drop on the unseen images (the written model
against the original in onnxruntime). The last two columns: the same conversion with
--no-compensate, its MAC ratio and unseen drop, run beside it (--no-baseline leaves them out).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # (after the environment is set)
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from data import mnist  # noqa: E402

from onnx_lowrank import CompressConfig, compress  # noqa: E402
from onnx_lowrank.calibration.data import CalibrationSet  # noqa: E402
from onnx_lowrank.quality import predict, session  # noqa: E402

MODELS = {"mnist_cnn": ROOT / "models" / "mnist_cnn.onnx", "digit_cnn": ROOT / "models" / "digit_cnn.onnx"}
UNSEEN = slice(5000, None)


def calibration_sets(n: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The five n-image sets by name (training[:n], test[0:n], ... test[3n:4n]), images and labels,
    and the unseen test images with their labels."""
    assert 4 * n <= UNSEEN.start, "the sets must not reach the unseen images"
    train, _, test = mnist()
    sets = {f"training[:{n}]": (train[0][:n], train[1][:n])}
    for k in range(4):
        sets[f"test[{k * n}:{(k + 1) * n}]"] = (test[0][k * n:(k + 1) * n], test[1][k * n:(k + 1) * n])
    return sets, (test[0][UNSEEN], test[1][UNSEEN])


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    sess = session(model)
    name = sess.get_inputs()[0].name
    logits = predict(sess, CalibrationSet({name: images}, labels), 256)[0]
    return float(np.mean(logits.argmax(1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mnist_cnn,digit_cnn")
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--holdout", type=float, default=None, help="default: the converter's")
    parser.add_argument("--no-baseline", action="store_true", help="not also with --no-compensate")
    args = parser.parse_args()
    n = args.size
    sets, (unseen_x, unseen_y) = calibration_sets(n)

    table = Table(title=f"MNIST at eps {args.eps}: five {n}-image calibration sets, judged on test[5000:] "
                        f"({len(unseen_y)} images no set holds)")
    columns = ("model", "calibration set", "its accuracy", "MACs", "params", f"drop ({n})", "cross-fitted",
               "held-out part", "stepped back", "unseen drop", "within eps", "time")
    for col in columns + (() if args.no_baseline else ("MACs, not compensated", "its unseen drop")):
        table.add_column(col, justify="right")
    for name in args.models.split(","):
        path = MODELS[name]
        base = accuracy(onnx.load(path), unseen_x, unseen_y)
        ratios, plain_ratios = [], []
        for label, (x, y) in sets.items():
            start = time.perf_counter()
            model, report = _convert(path, x, y, args.eps, args.holdout)
            seconds = time.perf_counter() - start
            unseen = base - accuracy(model, unseen_x, unseen_y)
            ratios.append(report.mac_ratio)
            baseline = []
            if not args.no_baseline:
                plain, plain_report = _convert(path, x, y, args.eps, args.holdout, compensate=False)
                plain_ratios.append(plain_report.mac_ratio)
                baseline = [f"{plain_report.mac_ratio:.2f}x", f"{base - accuracy(plain, unseen_x, unseen_y):.4f}"]
            # one sample of slack: the unseen part counts in steps of 1/len(unseen)
            within = unseen <= args.eps + 1 / len(unseen_y)
            table.add_row(name, label, f"{report.quality_before:.4f}", f"{report.mac_ratio:.2f}x",
                          f"{report.param_ratio:.2f}x", f"{report.drop:.4f}",
                          "-" if report.crossfit_drop is None else f"{report.crossfit_drop:.4f}",
                          f"{report.heldout_drop:.4f}",
                          str(report.backed_off), f"{unseen:.4f}", "yes" if within else "NO", f"{seconds:.0f}s",
                          *baseline)
            print(f"{name} {label}: {report.mac_ratio:.2f}x, drop {report.drop:.4f}, held-out part "
                  f"{report.heldout_drop:.4f}, unseen {unseen:.4f}", flush=True)
        plain_spread = [f"{max(plain_ratios) / min(plain_ratios):.2f}", ""] if plain_ratios else []
        table.add_row(name, "spread (max / min)", f"unseen {base:.4f}", f"{max(ratios) / min(ratios):.2f}",
                      *[""] * 8, *plain_spread, end_section=True)
    Console(width=220).print(table)


class Reader:
    """onnxruntime's CalibrationDataReader protocol: one batch of the whole set."""

    def __init__(self, name: str, x: np.ndarray):
        self.feeds = iter([{name: x}])

    def get_next(self):
        return next(self.feeds, None)


def _convert(path: Path, x: np.ndarray, y: np.ndarray, eps: float, holdout: float | None = None,
             compensate: bool = True):
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    config = CompressConfig(eps=eps, compensate=compensate)
    if holdout is not None:
        config = replace(config, holdout=holdout)
    return compress(str(path), config, Reader(name, x), y)


if __name__ == "__main__":
    main()
