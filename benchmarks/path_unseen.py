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
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from calibration_sets import MODELS, Reader  # noqa: E402
from data import mnist  # noqa: E402

from onnx_lowrank import CompressConfig, compress  # noqa: E402
from onnx_lowrank.calibration.data import CalibrationSet  # noqa: E402
from onnx_lowrank.runtime.sessions import predict, session  # noqa: E402
from onnx_lowrank.selection import SearchObserver  # noqa: E402


class Seen(SearchObserver):
    """The search's path, its pick, and how to build a point as written."""

    def searched(self, search, path, knobs, pick):
        self.search, self.path, self.pick = search, path, pick

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
    config = CompressConfig(eps=0.005, holdout=args.holdout)
    seen = Seen()
    name = onnx.load(MODELS[args.model], load_external_data=False).graph.input[0].name
    _, report = compress(str(MODELS[args.model]), config, Reader(name, x), y, observer=seen)
    # the held-out part as the converter split it (the same seed)
    _, held = CalibrationSet({name: x}, y).split(config.holdout, config.seed)
    unseen = CalibrationSet({name: ux}, uy)
    original = session(onnx.load(MODELS[args.model]))
    right = predict(original, unseen, 256)[0].argmax(1) == uy
    held_right = predict(original, held, 256)[0].argmax(1) == held.labels
    path, k, search = seen.path, seen.pick, seen.search
    print(f"{'MACs':>7} {'held-out lost':>14} {'gained':>7} {'unseen lost':>12} {'gained':>7} {'unseen drop':>12}")
    for i in sorted(set(range(1, len(path), max(1, len(path) // 40))) | {k}):
        sess = session(search.written(path[i]))
        held_now = predict(sess, held, 256)[0].argmax(1) == held.labels
        new = predict(sess, unseen, 256)[0].argmax(1) == uy
        print(f"{search.cost_ratio(path[i]):6.2f}x {int(np.sum(held_right & ~held_now)):14d} "
              f"{int(np.sum(held_now & ~held_right)):7d} {int(np.sum(right & ~new)):12d} {int(np.sum(new & ~right)):7d} "
              f"{(right.sum() - new.sum()) / len(uy):12.4f}{'  <- the search picks' if i == k else ''}", flush=True)
    print(f"written: {report.mac_ratio:.2f}x, held-out drop {report.drop:.4f}, bound {report.bound:.4f} "
          f"at {report.confidence:g}")

if __name__ == "__main__":
    main()
