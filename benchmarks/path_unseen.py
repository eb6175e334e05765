"""Why the held-out part decides: every few points of auto's λ path, built as the converter writes
them (compensated on the search part), judged on every MNIST validation and test image outside
the calibration set, beside what the held-out part counts. The search's pick, the cheapest point
it measured within eps, is marked.

    .venv/bin/python benchmarks/path_unseen.py [--set test0] [--model mnist_cnn] [--holdout 0.8]

--set: test0 (test[0:1000]) or training (training[:1000]). Columns: the MAC ratio, samples lost
and gained on the held-out part, lost and gained on the unseen images, and the unseen drop.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # (after the environment is set)
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from calibration_sets import MODELS, _convert  # noqa: E402
from data import mnist  # noqa: E402

import onnx_lowrank.pipeline as pipeline  # noqa: E402
import onnx_lowrank.selection.auto as auto  # noqa: E402
from onnx_lowrank import CompressConfig  # noqa: E402
from onnx_lowrank.calibration.data import CalibrationSet  # noqa: E402
from onnx_lowrank.quality import predict, session  # noqa: E402
from onnx_lowrank.verify import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", default="test0", choices=("test0", "training"))
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--holdout", type=float, default=CompressConfig().holdout)
    args = parser.parse_args()
    train, val, test = mnist()
    if args.set == "test0":
        x, y = test[0][:1000], test[1][:1000]
        ux, uy = np.concatenate([val[0], test[0][1000:]]), np.concatenate([val[1], test[1][1000:]])
    else:
        x, y = train[0][:1000], train[1][:1000]
        ux, uy = np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]])
    seen = {}
    pick = auto.cheapest_within

    def cheapest_within(search, path, knobs):  # the search's path and pick, kept for below
        seen["path"], seen["k"] = path, pick(search, path, knobs)
        return seen["k"]

    decide = pipeline.verify_choice

    def verify_choice(prepared, problems, choice, metric, data, reference, config, **kw):
        path, k = seen["path"], seen["k"]
        name = prepared.graph.input[0].name
        unseen = CalibrationSet({name: ux}, uy)
        right = predict(session(prepared), unseen, 256)[0].argmax(1) == uy
        held_right = reference[0].argmax(1) == data.labels
        full = sum(p.base_cost for p in problems)
        print(f"{'MACs':>7} {'held-out lost':>14} {'gained':>7} {'unseen lost':>12} {'gained':>7} {'unseen drop':>12}")
        for i in sorted(set(range(1, len(path), max(1, len(path) // 40))) | {k}):
            sess = session(build(prepared, problems, path[i], False, kw.get("compensation")))
            held = predict(sess, data, 256)[0].argmax(1) == data.labels
            new = predict(sess, unseen, 256)[0].argmax(1) == uy
            ratio = full / sum(path[i][p.name].cost for p in problems)
            print(f"{ratio:6.2f}x {int(np.sum(held_right & ~held)):14d} {int(np.sum(held & ~held_right)):7d} "
                  f"{int(np.sum(right & ~new)):12d} {int(np.sum(new & ~right)):7d} "
                  f"{(right.sum() - new.sum()) / len(uy):12.4f}{'  <- the search picks' if i == k else ''}",
                  flush=True)
        return decide(prepared, problems, choice, metric, data, reference, config, **kw)

    auto.cheapest_within, pipeline.verify_choice = cheapest_within, verify_choice
    _, report = _convert(MODELS[args.model], x, y, CompressConfig(eps=0.005, holdout=args.holdout))
    print(f"written: {report.mac_ratio:.2f}x, held-out drop {report.drop:.4f}, bound {report.bound:.4f} "
          f"at {report.confidence:g}")


if __name__ == "__main__":
    main()
