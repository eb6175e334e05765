"""`--select rank`: every layer factored by its preferred method at a fixed rank (`--rank R`,
capping each mode's rank at R) or a fixed fraction of its cost (`--ratio f`). With neither, the
fraction is the same for every layer and set by binary search to the cheapest that keeps the
measured drop within eps: uniform compression, the baseline the other strategies must beat."""

from __future__ import annotations

import numpy as np

from ...decompositions import decompose
from ..candidates import Candidate, LayerProblem, cost_of
from ..search import Context, Search, Selection, cheapest_within

FRACTIONS = np.geomspace(1 / 64, 1, 49)


def at_rank(p: LayerProblem, method: str, rank, cost: str) -> Candidate:
    factors = decompose(p.layer, method, rank=rank)
    c = cost_of(p.target.layer, factors, p.stats.in_spatial, cost)
    if c >= p.base_cost:
        return p.keep
    return Candidate(method, factors, c, factors.output_error(p.moment))


def select(search: Search, ctx: Context) -> Selection:
    """--rank or --ratio for every layer; without them, the cheapest uniform share of every
    layer's cost within eps."""
    methods, rank, ratio, cost = ctx.methods, ctx.rank, ctx.ratio, ctx.cost
    choice, reasons = {}, {}
    if rank is not None or ratio is not None:
        for p in search.problems:
            method = p.preferred(methods)
            if method is None:
                choice[p.name], reasons[p.name] = p.keep, "kept: no method applies"
            elif rank is not None:
                choice[p.name] = at_rank(p, method, rank, cost)
                reasons[p.name] = f"--rank {rank}" + ("" if choice[p.name].factors else " is no cheaper than the layer: kept")
            else:
                choice[p.name] = p.at_fraction(method, ratio)
                reasons[p.name] = f"--ratio {ratio}"
        search.drop(choice, f"rank={rank}" if rank is not None else f"ratio={ratio}")
        return Selection(choice, reasons)
    path, knobs = [], []
    for f in FRACTIONS[::-1]:  # from keep-all to the cheapest
        path.append({p.name: (p.at_fraction(m, f) if (m := p.preferred(methods)) else p.keep)
                     for p in search.problems})
        knobs.append(f"ratio={f:.3f}")
    k = cheapest_within(search, path, knobs)
    return Selection(path[k], {p.name: f"uniform {knobs[k]} of every layer's cost" for p in search.problems})
