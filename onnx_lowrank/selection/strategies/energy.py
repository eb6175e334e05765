"""`--select energy`: TTPWT's and RSDTR's energy criterion. Each layer takes its cheapest candidate
that keeps at least `--energy` of the energy of its outputs on the captured inputs (error^2 <=
1 - energy; the weights' energy when factors are not data-aware). Without `--energy` the
threshold is set by binary search to the lowest that keeps the measured drop within eps."""

from __future__ import annotations

import numpy as np

from ..candidates import LayerProblem
from ..search import Context, Search, Selection, cheapest_within

LEVELS = 1 - np.geomspace(1e-4, 0.9, 60)  # energy thresholds, from 0.9999 down to 0.1


def at_energy(p: LayerProblem, energy: float):
    fits = [c for c in p.candidates if c.error ** 2 <= 1 - energy]
    return min(fits, key=lambda c: c.cost)


def select(search: Search, ctx: Context) -> Selection:
    energy = ctx.energy
    if energy is not None:
        choice = {p.name: at_energy(p, energy) for p in search.problems}
        search.drop(choice, f"energy={energy}")
        level = energy
    else:
        path = [{p.name: at_energy(p, e) for p in search.problems} for e in LEVELS]
        knobs = [f"energy={e:.4f}" for e in LEVELS]
        level = LEVELS[cheapest_within(search, path, knobs)]
        choice = path[list(LEVELS).index(level)]
    return Selection(choice, {p.name: f"cheapest keeping {level:.4f} of the output energy" for p in search.problems})
