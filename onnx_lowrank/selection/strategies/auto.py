"""`--select auto`: global allocation under the budget. Each layer picks the candidate minimising
cost + lambda * s * error^2: its cost in MACs or parameters, its relative output error on the
captured inputs, and s, how strongly that layer's error reaches the model's outputs (measured,
`sensitivity.py`); lambda sets how much distortion buys how much cost, the same for every layer.
Each layer's pick only changes at a few values of lambda (the corners of the lower convex hull of
its (s * error^2, cost) points), so the whole range of lambda is a path of at most as many
distinct models as there are candidates, from keeping everything to the cheapest of all; a binary
search along it, measuring each model's quality drop in onnxruntime, finds the cheapest one
within eps in about log2(path length) whole-model passes."""

from __future__ import annotations

from ..candidates import Candidate, LayerProblem
from ..search import Choice, Context, Search, Selection, cheapest_within
from ..sensitivity import sensitivities


def hull(candidates: list[Candidate], weight: float = 1.0) -> list[Candidate]:
    """The candidates some lambda >= 0 picks: the lower convex hull of (weight * error^2, cost),
    from the most accurate (keep) to the cheapest."""
    def x(c: Candidate) -> float:
        return weight * c.error ** 2

    chain: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (x(c), c.cost)):
        if chain and c.cost >= chain[-1].cost:
            continue  # no cheaper than a more accurate one: never picked
        while len(chain) >= 2:
            a, b = chain[-2], chain[-1]
            # b is not picked if it lies on or above the segment a-c
            cross = (x(b) - x(a)) * (c.cost - a.cost) - (b.cost - a.cost) * (x(c) - x(a))
            if cross <= 0:
                chain.pop()
            else:
                break
        chain.append(c)
    return chain


def breakpoints(problem: LayerProblem, weight: float = 1.0) -> list[tuple[float, Candidate]]:
    """(lambda, candidate): below lambda the layer moves to the candidate."""
    chain = hull(problem.candidates, weight)
    return [((a.cost - b.cost) / max(weight * (b.error ** 2 - a.error ** 2), 1e-300), b)
            for a, b in zip(chain, chain[1:])]


def lambda_path(problems: list[LayerProblem], weights: dict[str, float] | None = None
                ) -> tuple[list[Choice], list[str]]:
    """Choices from lambda = infinity (keep all) down to 0 (cheapest of all), one per corner."""
    weights = weights or {}
    events = sorted(((lam, p.name, c) for p in problems for lam, c in breakpoints(p, weights.get(p.name, 1.0))),
                    key=lambda e: -e[0])
    choice = {p.name: p.keep for p in problems}
    path, knobs = [dict(choice)], ["lambda=inf"]
    for lam, name, cand in events:
        choice[name] = cand
        path.append(dict(choice))
        knobs.append(f"lambda={lam:.3g}")
    return path, knobs


def select(search: Search, ctx: Context) -> Selection:
    """The cheapest point of the lambda path within eps, each layer weighted by its measured
    sensitivity s (sensitivity.py)."""
    weights = sensitivities(search.problems, ctx.prepared, ctx.data)
    path, knobs = lambda_path(search.problems, weights)
    k = cheapest_within(search, path, knobs)
    search.observer.searched(search, path, knobs, k)
    choice = path[k]
    search.path = path[:k + 1]
    lam = knobs[k]
    reasons = {}
    for p in search.problems:
        s = weights[p.name]
        reasons[p.name] = (f"least cost + {lam} * s * error^2, s={s:.3g}" if choice[p.name].factored
                           else f"kept: no factorization pays for its error, s={s:.3g}")
    return Selection(choice, reasons)
