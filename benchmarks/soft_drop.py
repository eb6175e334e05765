"""Would a smooth surrogate hold eps better than the count? (issue 13's open question.)

    .venv/bin/python benchmarks/soft_drop.py [--eps 0.005] [--bounds 0.01,0.015,0.02]

The conversions of benchmarks/calibration_sets.py (the default MNIST model and the digit CNN,
eps 0.005, accuracy, five 1000-image calibration sets), each run once, without compensation
(--no-compensate: this study and its tables in docs/selection.md came before it). Every model
the search measures (DropMeter, wrapped here to see them) is also measured three ways:
- hard: the accuracy drop on the search part, what the converter counts;
- soft: the mean softmax probability of the label lost on the search part, a smooth surrogate;
- unseen: the accuracy drop on MNIST test[5000:], which no set holds.
Printed: every measured point, then, for each bound c, the point a rule "the cheapest measured
point with soft <= c" would have taken, with its hard and unseen drops. Only the points this
search measured are candidates: a search on the soft drop would measure others. Last, the same
for the default model's `--quantize int8` search (models/mnist_calib.npz), judged on MNIST
test[2000:] as benchmarks/quantize.py judges it (docs/quantization.md's table).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # (after the environment is set)
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_sets import MODELS, _convert, calibration_sets  # noqa: E402
from data import mnist  # noqa: E402

from onnx_lowrank import quality as Q  # noqa: E402
from onnx_lowrank.calibration.data import CalibrationSet  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.pipeline import compress_file  # noqa: E402


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def soft_drop(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> float:
    rows = np.arange(len(labels))
    return float(np.mean(softmax(reference)[rows, labels] - softmax(outputs)[rows, labels]))


def hard_drop(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(reference.argmax(1) == labels) - np.mean(outputs.argmax(1) == labels))


def measured(report) -> list:
    """The search's trace points that ran a model, in the order it ran them (as the wrapped
    DropMeter saw them; the check's runs come after): the float search takes keeping every layer
    for the original, drop 0, without running it."""
    return [t for t in report.trace if not (t.cost_ratio == 1.0 and t.drop == 0.0)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--bounds", default="0.01,0.015,0.02", help="soft-drop bounds c to try")
    args = parser.parse_args()
    sets, (unseen_x, unseen_y) = calibration_sets(1000)
    _, _, test = mnist()  # the quantized search below is judged on test[2000:]

    seen: list[tuple[float, float, float]] = []  # (soft, hard, unseen) of each model measured
    state = {}
    measure = Q.DropMeter.__call__

    def wrapped(self, model):
        value = measure(self, model)
        sess = model if not isinstance(model, onnx.ModelProto) else Q.session(model)
        out = Q.predict(sess, self.data, 256)[0]
        unseen = Q.predict(sess, state["unseen"], 500)[0]
        seen.append((soft_drop(self.reference[0], out, self.labels), hard_drop(self.reference[0], out, self.labels),
                     hard_drop(state["reference"], unseen, state["labels"])))
        return value

    Q.DropMeter.__call__ = wrapped
    bounds = [float(b) for b in args.bounds.split(",")]
    points = Table(title="every model the search measured: MACs, then soft / hard on the search part, unseen hard")
    for col in ("model", "calibration set", "written", "points (MACs: soft / hard / unseen)"):
        points.add_column(col)
    rules = Table(title=f"the cheapest measured point with soft <= c (eps {args.eps}; unseen: test[5000:])")
    for col in ("model", "c", *sets, "max / min", "worst unseen"):
        rules.add_column(col, justify="right")

    def judge_on(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> None:
        state["unseen"], state["labels"] = CalibrationSet({model.graph.input[0].name: x}), y
        state["reference"] = Q.predict(Q.session(model), state["unseen"], 500)[0]

    for name, path in MODELS.items():
        model = onnx.load(path)
        judge_on(model, unseen_x, unseen_y)
        paths = {}
        for label, (x, y) in sets.items():
            seen.clear()
            _, report = _convert(path, x, y, args.eps, compensate=False)
            paths[label] = sorted((t.cost_ratio, *m) for t, m in zip(measured(report), seen))
            points.add_row(name, label, f"{report.mac_ratio:.2f}x",
                           "  ".join(f"{r:.2f}x: {s:.4f}/{h:.4f}/{u:.4f}" for r, s, h, u in paths[label]))
        for c in bounds:
            picks = {label: max((p for p in pts if p[1] <= c), default=(1.0, 0.0, 0.0, 0.0))
                     for label, pts in paths.items()}
            ratios = [p[0] for p in picks.values()]
            rules.add_row(name, f"{c:g}", *(f"{r:.2f}x (hard {h:.4f}, unseen {u:.4f})" for r, _, h, u in picks.values()),
                          f"{max(ratios) / min(ratios):.2f}", f"{max(p[3] for p in picks.values()):.4f}")
    # the default model's quantized search, judged on test[2000:] (benchmarks/quantize.py's unseen part)
    path = MODELS["mnist_cnn"]
    judge_on(onnx.load(path), test[0][2000:], test[1][2000:])
    seen.clear()
    with tempfile.TemporaryDirectory() as tmp:
        report = compress_file(path, Path(tmp) / "q.onnx", CompressConfig(eps=args.eps, quantize="int8"),
                               str(ROOT / "models" / "mnist_calib.npz"), "labels")
    quantized = Table(title="mnist_cnn --quantize int8 (models/mnist_calib.npz): every model the search measured, "
                            "unseen = test[2000:]")
    for col in ("MACs", "soft", "hard", "unseen"):
        quantized.add_column(col, justify="right")
    for r, soft, hard, unseen in sorted((t.cost_ratio, *m) for t, m in zip(measured(report), seen)):
        quantized.add_row(f"{r:.2f}x", f"{soft:.4f}", f"{hard:.4f}", f"{unseen:.4f}")
    console = Console(width=250)
    console.print(points)
    console.print(rules)
    console.print(quantized)


if __name__ == "__main__":
    main()
