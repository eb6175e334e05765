"""Per layer, the candidates a strategy chooses from: factorizations at a ladder of ranks for each
applicable method, plus "keep the original", each with its cost and its error on the layer's
captured inputs. Only candidates cheaper than the layer itself are kept."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from ..calibration.capture import LayerStats
from ..decompositions import decompose, reason_not_applicable
from ..decompositions import spatial_svd, svd, tucker2
from ..decompositions.base import Factors, Layer, normalize_ranks
from ..errors import UnsupportedLayer
from ..graph.targets import LayerTarget

AUTO_METHODS = ("svd", "spatial-svd", "tucker2")
RANK_STEPS = 40                      # ladder length for rank-indexed methods
EPS_STEPS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)  # for eps-indexed ones


@dataclass(eq=False)
class Candidate:
    method: str | None            # None: keep the original layer
    factors: Factors | None
    cost: float
    error: float                  # relative output error on the captured inputs

    @property
    def ranks(self) -> tuple[int, ...]:
        return () if self.factors is None else self.factors.ranks


@dataclass(eq=False)
class LayerProblem:
    target: LayerTarget
    stats: LayerStats
    layer: Layer                 # what is factored: with the input moment when data-aware
    moment: np.ndarray           # the input moment errors are measured with, always
    base_cost: float
    candidates: list[Candidate] = field(default_factory=list)  # by cost, the last one "keep"
    declined: dict[str, str] = field(default_factory=dict)     # method -> reason

    def of(self, method: str) -> list[Candidate]:
        """The ladder of one method, by cost."""
        return [c for c in self.candidates if c.method == method]

    def preferred(self, methods: tuple[str, ...] | None) -> str | None:
        """The method fixed-rank strategies use: the first of `methods` that has candidates; by
        default 004's choice, Tucker-2 for a conv with a spatial kernel and SVD otherwise."""
        order = methods or (("tucker2", "svd") if any(k > 1 for k in self.layer.kernel) else ("svd",))
        return next((m for m in order if self.of(m)), None)

    def at_fraction(self, method: str, fraction: float) -> Candidate:
        """The most accurate candidate of `method` costing at most `fraction` of the layer
        (its cheapest when none does; keep at fraction >= 1)."""
        if fraction >= 1:
            return self.keep
        ladder = self.of(method)
        fits = [c for c in ladder if c.cost <= fraction * self.base_cost]
        return min(fits, key=lambda c: c.error) if fits else ladder[0]

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def keep(self) -> Candidate:
        return self.candidates[-1]


def cost_of(layer: Layer, factors: Factors | None, in_spatial, kind: str) -> float:
    if kind == "params":
        return float(layer.params if factors is None else factors.params)
    return float(layer.macs(in_spatial) if factors is None else factors.macs(in_spatial))


def rank_ladder(full: int, steps: int = RANK_STEPS) -> list[int]:
    return sorted({int(round(x)) for x in np.geomspace(1, full, steps)})


def method_ladder(name: str, layer: Layer) -> list[tuple[Factors, float | None]]:
    """Factors of `layer` by method `name` along its ladder, each with its error when the method
    knows it in closed form (data-aware SVD), else None. The SVD-based methods decompose once and
    truncate; a grouped conv goes through `decompose`, which factors it group by group."""
    if layer.groups > 1 and name in ("svd", "spatial-svd", "tucker2"):
        t, c = layer.out_channels // layer.groups, layer.in_per_group
        if name == "tucker2":
            per_group = replace(layer, weight=layer.weight[:t], groups=1, input_cov=None)
            full = tucker2.full_ranks(per_group)
            ranks = sorted({normalize_ranks(f, full) for f in np.geomspace(1 / 64, 1, RANK_STEPS)})
        else:
            k = layer.kernel
            full = min(t, c * int(np.prod(k))) if name == "svd" else min(c * k[0], t * k[1])
            ranks = rank_ladder(full)
        return [(decompose(layer, name, rank=r), None) for r in ranks]
    if name == "svd":
        t = svd.Truncations(layer)
        exact = layer.input_cov is not None
        return [(t.at(r), t.tail_error(r) if exact else None) for r in rank_ladder(t.full)]
    if name == "spatial-svd":
        t = spatial_svd.Truncations(layer)
        return [(t.at(r), None) for r in rank_ladder(t.full)]
    if name == "tucker2":
        t = tucker2.Truncations(layer)
        full = tucker2.full_ranks(layer)
        pairs = sorted({normalize_ranks(f, full) for f in np.geomspace(1 / 64, 1, RANK_STEPS)})
        return [(t.at(*p), None) for p in pairs]
    if name in ("tt", "tr"):
        return [(decompose(layer, name, eps=e), None) for e in EPS_STEPS]
    if name == "cp":
        full = int(np.prod(layer.kernel)) * layer.in_per_group * layer.out_channels
        full //= layer.in_per_group + int(np.prod(layer.kernel)) + layer.out_channels // layer.groups
        return [(decompose(layer, "cp", rank=int(r)), None) for r in rank_ladder(max(full, 1), 8)]
    if name == "tucker2-cp":
        full = tucker2.full_ranks(layer)
        out = []
        for f in np.geomspace(1 / 16, 1, 8):
            r1, r2 = normalize_ranks(f, full)
            out.append((decompose(layer, name, rank=(r1, r2, max(r1, r2))), None))
        return out
    raise ValueError(f"unknown decomposition {name!r}")


def build_problem(target: LayerTarget, stats: LayerStats, methods: tuple[str, ...], cost: str,
                  data_aware: bool) -> LayerProblem:
    moment = stats.second_moment()
    layer = replace(target.layer, input_cov=moment if data_aware else None)
    base = cost_of(target.layer, None, stats.in_spatial, cost)
    problem = LayerProblem(target, stats, layer, moment, base)
    cands: list[Candidate] = []
    for name in methods:
        reason = reason_not_applicable(layer, name)
        if reason is None and name == "spatial-svd" and all(k == 1 for k in layer.kernel):
            reason = "1x1 kernel: spatial-svd is svd there"
        if reason:
            problem.declined[name] = reason
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ladder = method_ladder(name, layer)
        except UnsupportedLayer as e:
            problem.declined[name] = str(e)
            continue
        for factors, error in ladder:
            c = cost_of(target.layer, factors, stats.in_spatial, cost)
            if c >= base:
                continue
            err = error if error is not None else factors.output_error(moment)
            cands.append(Candidate(name, factors, c, err))
    cands.sort(key=lambda c: (c.cost, c.error))
    problem.candidates = cands + [Candidate(None, None, base, 0.0)]
    return problem

