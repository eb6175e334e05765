"""Rank-selection strategies side by side at the same eps, on three real models, plus data-aware
against plain factors at equal ranks.

    .venv/bin/python benchmarks/selection.py [--models mnist_cnn,digit_cnn,mobilenet_v2] [--strategies ...]

Protocols (the tool never sees the images it is judged on):
- mnist_cnn (models/mnist_cnn.onnx, trained here) and digit_cnn (digit-recognizer-py): calibration
  = the first 2000 MNIST test images with labels, eps 0.005 on accuracy; judged on the other 8000
  test images. (Calibrating on training images works too but is conservative: the networks
  memorised them, and compression costs accuracy there first.)
- mobilenet_v2 (torchvision weights): calibration = 16 random crops of each of the 13 real photos,
  eps 0.01 on top-1 agreement with the original; also judged on 8 fresh crops per photo.
Wall time is the whole convert, measured in this run, one strategy after another.
"""

from __future__ import annotations

import os

# one BLAS thread: OpenBLAS's spinning threads slow everything down several times on shared cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402  (after the environment is set)
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from data import MODELS, mnist, photo_crops
from rich.console import Console
from rich.table import Table

from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress
from onnx_lowrank.runtime.sessions import session

STRATEGIES = ("auto", "cosine", "hessian", "energy", "vbmf", "rank")
# SVD (weight SVD on convs) capped at rank R everywhere: equal ranks by construction, and the one
# method whose whitening is exact
EQUAL_RANK = {"mnist_cnn": 8, "digit_cnn": 8, "mobilenet_v2": 128}


def predict(model, x: np.ndarray, name: str) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def setups(folder: Path, names: list[str]) -> list[dict]:
    out = []
    if {"mnist_cnn", "digit_cnn"} & set(names):
        _, _, (x, y) = mnist()
        calib = folder / "mnist_calib.npz"
        np.savez(calib, image=x[:2000], labels=y[:2000])
        for name in ("mnist_cnn", "digit_cnn"):
            if name in names:
                out.append(dict(name=name, path=MODELS / f"{name}.onnx", calib=calib, labels="labels", eps=0.005,
                                judge=(x[2000:], y[2000:]), input="image", judged_on="MNIST test[2000:] accuracy"))
    if "mobilenet_v2" in names:
        calib = folder / "photos.npz"
        np.savez(calib, input=photo_crops(16, seed=0))
        out.append(dict(name="mobilenet_v2", path=MODELS / "mobilenet_v2.onnx", calib=calib, labels=None, eps=0.01,
                        judge=(photo_crops(8, seed=1), None), input="input", judged_on="fresh crops: agreement"))
    return out


def judged_drop(setup: dict, original, compressed) -> tuple[float, float]:
    """(quality before, quality after) on the images the tool never saw."""
    x, y = setup["judge"]
    before = predict(original, x, setup["input"]).argmax(1)
    after = predict(compressed, x, setup["input"]).argmax(1)
    if y is None:
        return 1.0, float(np.mean(before == after))
    return float(np.mean(before == y)), float(np.mean(after == y))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mnist_cnn,digit_cnn,mobilenet_v2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    console = Console(width=200)
    with tempfile.TemporaryDirectory() as tmp:
        runs = setups(Path(tmp), args.models.split(","))
        strategies = args.strategies.split(",")
        table = Table(title="--select strategies at the same eps (no fine-tuning)")
        for col in ("model", "eps", "select", "MAC ratio", "param ratio", "held-out drop", "within eps",
                    "judged on", "before", "after", "unseen drop", "within eps", "wall time"):
            table.add_column(col, justify="right")
        equal = Table(title="data-aware vs plain factors at equal ranks (--select rank --rank R --methods svd)")
        for col in ("model", "rank R", "MAC ratio", "factors", "held-out drop", "judged on", "before", "after"):
            equal.add_column(col, justify="right")
        for setup in runs:
            original = onnx.load(str(setup["path"]))
            for select in strategies:
                config = CompressConfig(eps=setup["eps"], select=select)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, report = compress(setup["path"], config, setup["calib"], setup["labels"])
                seconds = time.perf_counter() - start
                before, after = judged_drop(setup, original, model)
                unseen = before - after
                table.add_row(setup["name"], str(setup["eps"]), select, f"{report.mac_ratio:.2f}x",
                              f"{report.param_ratio:.2f}x", f"{report.drop:.4f}",
                              "yes" if report.drop <= setup["eps"] else "NO", setup["judged_on"],
                              f"{before:.4f}", f"{after:.4f}", f"{unseen:.4f}",
                              "yes" if unseen <= setup["eps"] else "NO", f"{seconds:.0f}s")
                console.print(f"{setup['name']} {select}: {report.mac_ratio:.2f}x, drop {report.drop:.4f}, "
                              f"{before:.4f} -> {after:.4f}, {seconds:.0f}s", highlight=False)
                sys.stdout.flush()
            rank = EQUAL_RANK[setup["name"]]
            for aware in (True, False):
                config = CompressConfig(eps=setup["eps"], select="rank", rank=rank, methods=("svd",), data_aware=aware)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, report = compress(setup["path"], config, setup["calib"], setup["labels"])
                before, after = judged_drop(setup, original, model)
                equal.add_row(setup["name"], str(rank), f"{report.mac_ratio:.2f}x",
                              "data-aware" if aware else "plain", f"{report.drop:.4f}", setup["judged_on"],
                              f"{before:.4f}", f"{after:.4f}")
        console.print(table)
        console.print(equal)


if __name__ == "__main__":
    main()
