"""Could a better search along the same path hold eps and spread less? (issue 13's goal.)

    .venv/bin/python benchmarks/path_oracle.py [--models mnist_cnn,digit_cnn] [--eps 0.005]

The conversions of benchmarks/calibration_sets.py (five 1000-image calibration sets, eps 0.005,
accuracy), without compensation (--no-compensate: this study and its tables in docs/selection.md
came before it). `auto` builds a path of choices from keeping every layer to the cheapest of all
and bisects it on the search part. Here every point of that path is measured, in order, on the
search part and on the whole 1000-image set (where the written model is checked), until the
whole-set drop has stayed over 3 x eps for 8 points. Printed per set:
- written: what the converter wrote (bisection, then the check and its back-off);
- best on the search part: the cheapest path point within eps there (a search that measures
  every point, checked nowhere else);
- best on the whole set: the cheapest path point within eps on all 1000 images, the most any
  search along this path can write while `--eps` means the drop on the data given;
each with its drop on MNIST test[5000:], which no set holds. Slow (every point is a model run):
about 15 min.

With `--off-path`, a last column leaves the path: from the best point on the whole set, a greedy
search moves one layer at a time to one of its next cheaper candidates (any method), taking the
cheapest model that stays within eps on the whole set, until no move does: what a search free
to try any per-layer choice, and checked on the same images, could write. About 1000 model runs
per set (50 min more for the default model, measured with another job on the cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # (after the environment is set)
import sys
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_sets import MODELS, _convert, accuracy, calibration_sets  # noqa: E402

from onnx_lowrank import quality as Q  # noqa: E402
from onnx_lowrank.selection import auto  # noqa: E402

OVER, PATIENCE = 3, 8  # stop once the whole-set drop has stayed over OVER x eps for PATIENCE points
MOVES = 4  # the off-path search tries each layer's next MOVES cheaper candidates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mnist_cnn,digit_cnn")
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--off-path", action="store_true", help="add the greedy off-path search's column")
    args = parser.parse_args()
    eps = args.eps
    sets, (unseen_x, unseen_y) = calibration_sets(1000)

    state: dict = {}
    measure = Q.DropMeter.__call__

    def wrapped(self, model):  # the search part's drop, and the model kept for the whole-set one
        state["model"] = model
        return measure(self, model)

    bisect = auto.cheapest_within

    def whole_of(model) -> float:
        """The drop on the whole set (None: keeping every layer, the original, not run)."""
        return 0.0 if model is None else state["whole_base"] - accuracy(model, *state["whole"])

    def cheapest(points, column: int):
        """The cheapest point whose drop in `column` (1: search part, 2: whole set) is within eps."""
        # (accuracies differ by whole samples: 0.9910 - 0.9860 is 0.005 up to rounding)
        return max((p for p in points if p[column] <= eps + 1e-9), key=lambda p: p[0])

    def whole_drop(search, choice):
        """The whole-set drop of `choice`'s model, and the model. (The model is built by the
        search's own measure, which also runs it on the search part: the one way to get it.)"""
        search._cache.clear()
        state["model"] = None
        search.measure(choice)
        return whole_of(state["model"]), state["model"]

    def off_path(search, start):
        """Greedy from `start` (cost ratio, whole drop, model, choice): the cheapest one-layer move
        within eps on the whole set, again and again. Returns the last point and the models run."""
        current, runs = start, 0
        while True:
            moves = []
            for p in search.problems:
                cheaper = sorted((c for c in p.candidates if c.cost < current[3][p.name].cost), key=lambda c: -c.cost)
                for c in cheaper[:MOVES]:
                    choice = {**current[3], p.name: c}
                    drop, model = whole_drop(search, choice)
                    runs += 1
                    if drop <= eps + 1e-9:
                        moves.append((search.cost_ratio(choice), drop, model, choice))
            if not moves:
                return current, runs
            current = max(moves, key=lambda m: m[0])

    def every_point(search, path, knobs):
        points, over = [], 0
        for choice, knob in zip(path, knobs):
            search._cache.clear()
            state["model"] = None
            drop = search.drop(choice, knob)
            model = state["model"]
            whole = whole_of(model)
            points.append((search.cost_ratio(choice), drop, whole, model, choice))
            over = over + 1 if whole > OVER * eps else 0
            if over >= PATIENCE:
                break
        state["points"] = points
        if args.off_path:
            best = cheapest(points, 2)
            state["off"] = off_path(search, (best[0], best[2], best[3], best[4]))
        search._cache.clear()
        search.trace.clear()
        return bisect(search, path, knobs)  # what the converter does, from a clean cache

    Q.DropMeter.__call__ = wrapped
    auto.cheapest_within = every_point
    table = Table(title=f"the auto path measured point by point (eps {eps}; unseen: test[5000:], "
                        f"{len(unseen_y)} images)")
    columns = ("model", "calibration set", "path points", "written", "unseen", "best on search part",
               "unseen", "best on whole set", "its whole-set drop", "unseen")
    for col in columns + (("off-path", "models run", "unseen") if args.off_path else ()):
        table.add_column(col, justify="right")
    for name in args.models.split(","):
        path = MODELS[name]
        base = accuracy(onnx.load(path), unseen_x, unseen_y)
        picks = {"written": [], "search": [], "whole": [], "off": []}
        for label, (x, y) in sets.items():
            state["whole"], state["whole_base"] = (x, y), accuracy(onnx.load(path), x, y)
            model, report = _convert(path, x, y, eps, compensate=False)
            points = state["points"]
            on_search, on_whole = cheapest(points, 1), cheapest(points, 2)

            def unseen(m) -> float:
                return 0.0 if m is None else base - accuracy(m, unseen_x, unseen_y)

            picks["written"].append(report.mac_ratio)
            picks["search"].append(on_search[0])
            picks["whole"].append(on_whole[0])
            off = ()
            if args.off_path:
                (ratio, _, off_model, _), runs = state["off"]
                picks["off"].append(ratio)
                off = (f"{ratio:.2f}x", str(runs), f"{unseen(off_model):.4f}")
            table.add_row(name, label, str(len(points)), f"{report.mac_ratio:.2f}x", f"{unseen(model):.4f}",
                          f"{on_search[0]:.2f}x", f"{unseen(on_search[3]):.4f}", f"{on_whole[0]:.2f}x",
                          f"{on_whole[2]:.4f}", f"{unseen(on_whole[3]):.4f}", *off)
            print(f"{name} {label}: written {report.mac_ratio:.2f}x, search {on_search[0]:.2f}x, "
                  f"whole {on_whole[0]:.2f}x" + (f", off-path {off[0]} (unseen {off[2]})" if off else ""), flush=True)
        spread = {k: f"{max(v) / min(v):.2f} (min {min(v):.2f}x)" if v else "" for k, v in picks.items()}
        table.add_row(name, "max / min", "", spread["written"], "", spread["search"], "", spread["whole"], "", "",
                      *((spread["off"], "", "") if args.off_path else ()), end_section=True)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
