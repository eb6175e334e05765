"""Per layer, the candidates a strategy chooses from: factorizations at a ladder of ranks for each
applicable method, plus "keep the original", each with its cost and its error on the layer's
captured inputs. Only candidates cheaper than the layer itself are kept."""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Iterator

import numpy as np

from ..calibration.capture import LayerStats
from ..decompositions import decompose, reason_not_applicable, spatial_svd, svd, tucker2
from ..decompositions.base import Factors, Layer, Whitener, normalize_ranks
from ..errors import UnsupportedLayer
from ..graph.targets import LayerTarget
from ..runtime.latency import LayerTimer

AUTO_METHODS = ("svd", "spatial-svd", "tucker2")
TIMED = 6                            # --cost latency: chains timed per method ladder
RANK_STEPS = 40                      # ladder length for rank-indexed methods
EPS_STEPS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)  # for eps-indexed ones


class FactorCache:
    """The factors of candidates made on demand, the most recently used kept up to a number of
    bytes. A ladder's factors held all at once are many times the layer: VGG-16's first FC layer
    (4096 x 25088) has 30 SVD rungs below its cost, 4 GB of factors in float64; its truncations,
    from which any rung is a slice, are two matrices of the layer's size. One per conversion (its
    limit a share of --max-memory), shared by the threads that build and read candidates."""

    def __init__(self, limit: int = 512 * 2**20):
        self.limit, self.used = limit, 0
        self.entries: OrderedDict[Candidate, tuple[Factors, int]] = OrderedDict()  # keyed by identity
        self.lock = threading.Lock()

    def get(self, candidate: "Candidate") -> Factors:
        with self.lock:
            if candidate in self.entries:
                self.entries.move_to_end(candidate)
                return self.entries[candidate][0]
        factors = candidate.make()
        size = 8 * factors.params
        with self.lock:
            self.entries[candidate] = (factors, size)
            self.used += size
            while self.used > self.limit and len(self.entries) > 1:
                _, (_, freed) = self.entries.popitem(last=False)
                self.used -= freed
        return factors


@dataclass(eq=False)
class Candidate:
    method: str | None            # None: keep the original layer
    stored: Factors | None        # its factors, or None when they are made on demand by `make`
    cost: float
    error: float                  # relative output error on the captured inputs
    make: Callable[[], Factors] | None = field(default=None, repr=False)
    made_ranks: tuple[int, ...] = ()
    cache: FactorCache | None = field(default=None, repr=False)  # where factors made by `make` are kept

    @property
    def factored(self) -> bool:
        """Whether this candidate replaces the layer (else it keeps it)."""
        return self.method is not None

    @property
    def factors(self) -> Factors | None:
        if self.stored is not None or self.make is None:
            return self.stored
        return self.cache.get(self)

    @property
    def ranks(self) -> tuple[int, ...]:
        if not self.factored:
            return ()
        return self.made_ranks if self.stored is None else self.stored.ranks


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
        default Kokhazadeh et al.'s choice, Tucker-2 for a conv with a spatial kernel and SVD otherwise."""
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


def rank_ladder(full: int, steps: int = RANK_STEPS, multiple: int = 1) -> list[int]:
    return sorted({round_rank(int(round(x)), full, multiple) for x in np.geomspace(1, full, steps)})


def round_rank(rank: int, full: int, multiple: int) -> int:
    """`rank` to the nearest multiple of `multiple` (at least one multiple), never past `full`."""
    if multiple <= 1:
        return rank
    return min(full, max(multiple, multiple * int(round(rank / multiple))))


def pair_ladder(full: tuple[int, int], multiple: int = 1) -> list[tuple[int, int]]:
    """Tucker-2's (output, input) rank pairs, both at one fraction of their full ranks."""
    pairs = (normalize_ranks(f, full) for f in np.geomspace(1 / 64, 1, RANK_STEPS))
    return sorted({tuple(round_rank(r, n, multiple) for r, n in zip(p, full)) for p in pairs})


class _Rung:
    """A rung of a nested ladder, remade from the truncations when its factors are needed."""

    def __init__(self, truncations, factors: Factors):
        self.truncations, self.ranks = truncations, factors.ranks

    def make(self) -> Factors:
        return self.truncations.at(*self.ranks)


@dataclass
class Ladder:
    """One method's factorizations of a layer along its ranks: decomposed one by one (`made`), or
    cut from one nested family (`truncations`, at each of `ranks`), which measures all their
    output errors in one pass and makes each rung when asked (`each`): made all at once, VGG-16's
    first FC layer's 30 SVD rungs would be 4 GB."""
    made: list[Factors] | None = None
    truncations: object | None = None
    ranks: list = field(default_factory=list)

    def each(self) -> Iterator[Factors]:
        if self.truncations is None:
            yield from self.made
            return
        for r in self.ranks:
            yield self.truncations.at(*(r if isinstance(r, tuple) else (r,)))

    @property
    def factors(self) -> list[Factors]:
        return list(self.each())


def method_ladder(name: str, layer: Layer, multiple: int = 1, white: Whitener | None = None) -> Ladder:
    """Factors of `layer` by method `name` along its ladder (ranks multiples of `multiple` for
    the SVD-based methods). The SVD-based methods decompose once and truncate; a grouped conv
    goes through `decompose`, which factors it group by group. `white`: the Whitener of
    `layer.input_cov` when the caller has it (its Cholesky is the costliest step of a wide layer)."""
    if layer.groups > 1 and name in ("svd", "spatial-svd", "tucker2"):
        t, c = layer.out_channels // layer.groups, layer.in_per_group
        if name == "tucker2":
            per_group = replace(layer, weight=layer.weight[:t], groups=1, input_cov=None)
            ranks = pair_ladder(tucker2.full_ranks(per_group), multiple)
        else:
            k = layer.kernel
            full = min(t, c * int(np.prod(k))) if name == "svd" else min(c * k[0], t * k[1])
            ranks = rank_ladder(full, multiple=multiple)
        return Ladder([decompose(layer, name, rank=r) for r in ranks])
    if name in ("svd", "spatial-svd"):
        t = svd.Truncations(layer, white) if name == "svd" else spatial_svd.Truncations(layer)
        return Ladder(None, t, rank_ladder(t.full, multiple=multiple))
    if name == "tucker2":
        t = tucker2.Truncations(layer)
        return Ladder(None, t, pair_ladder(tucker2.full_ranks(layer), multiple))
    if name in ("tt", "tr"):
        return Ladder([decompose(layer, name, eps=e) for e in EPS_STEPS])
    if name == "cp":
        full = int(np.prod(layer.kernel)) * layer.in_per_group * layer.out_channels
        full //= layer.in_per_group + int(np.prod(layer.kernel)) + layer.out_channels // layer.groups
        return Ladder([decompose(layer, "cp", rank=int(r)) for r in rank_ladder(max(full, 1), 8)])
    if name == "tucker2-cp":
        full = tucker2.full_ranks(layer)
        out = []
        for f in np.geomspace(1 / 16, 1, 8):
            r1, r2 = normalize_ranks(f, full)
            out.append(decompose(layer, name, rank=(r1, r2, max(r1, r2))))
        return Ladder(out)
    raise ValueError(f"unknown decomposition {name!r}")


def build_problem(target: LayerTarget, stats: LayerStats, methods: tuple[str, ...], cost: str,
                  data_aware: bool, multiple: int = 1, cache: FactorCache | None = None) -> LayerProblem:
    """`cost`: macs or params (for --cost latency, build with macs and then `price_latency`);
    `cache`: where candidates made on demand keep their factors (a new one of its own if None).
    Pure numpy and thread-safe: layers are built in parallel."""
    cache = cache or FactorCache()
    moment = stats.second_moment()
    layer = replace(target.layer, input_cov=moment if data_aware else None)
    base = cost_of(target.layer, None, stats.in_spatial, cost)
    problem = LayerProblem(target, stats, layer, moment, base)
    cands: list[Candidate] = []
    try:
        if not np.all(np.isfinite(moment)):  # inputs beyond float32's range: the sums overflowed
            raise np.linalg.LinAlgError("the layer's input moments overflow")
        # one Cholesky of the moment for both the errors and the data-aware SVD
        white = Whitener(moment) if target.layer.groups == 1 else None
        meter = ErrorMeter(target.layer, moment, white)
    except np.linalg.LinAlgError as e:  # weights or inputs so extreme that LAPACK gives up
        problem.declined = {name: f"numerical failure: {e}" for name in methods}
        methods = ()
    for name in methods:
        reason = reason_not_applicable(layer, name)
        if reason is None and name == "spatial-svd" and all(k == 1 for k in layer.kernel):
            reason = "1x1 kernel: spatial-svd is svd there"
        if reason:
            problem.declined[name] = reason
            continue
        try:
            ladder = method_ladder(name, layer, multiple, white if data_aware else None)
            cheaper = []  # never larger than the layer; a nested ladder's rungs made again on demand
            for f in ladder.each():
                c = cost_of(target.layer, f, stats.in_spatial, cost)
                if c < base:
                    cheaper.append((f if ladder.truncations is None else _Rung(ladder.truncations, f), c))
            errors = meter.errors([f for f, _ in cheaper], ladder.truncations)
        except UnsupportedLayer as e:
            problem.declined[name] = str(e)
            continue
        except np.linalg.LinAlgError as e:
            problem.declined[name] = f"numerical failure: {e}"
            continue
        cands.extend(Candidate(name, None, c, e, f.make, f.ranks, cache) if isinstance(f, _Rung) else Candidate(name, f, c, e)
                     for (f, c), e in zip(cheaper, errors))
    cands.sort(key=lambda c: (c.cost, c.error))
    problem.candidates = cands + [Candidate(None, None, base, 0.0)]
    return problem


def build_problems(targets: list[LayerTarget], stats: dict[str, LayerStats], methods: tuple[str, ...],
                   cost: str, data_aware: bool, multiple: int = 1, workers: int = 0,
                   advance: Callable[[], None] = lambda: None, cache: FactorCache | None = None
                   ) -> list[LayerProblem]:
    """`build_problem` for every target, `workers` layers at a time (0: one per CPU), in order.
    Threads, not processes: the work is LAPACK and BLAS, which run without the GIL, and a process
    would need each layer's input moment (170 MB for a 512-channel 3x3 conv) pickled to it. The
    largest layers go first so the last ones to finish are short."""
    workers = workers or os.cpu_count() or 1
    cache = cache or FactorCache()
    order = sorted(targets, key=lambda t: -t.layer.weight.size * stats[t.name].dim)
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        # the numerics' warnings (float warnings of degenerate layers, tensorly's note when CP's SVD
        # start fills short modes): filters are process-wide, so they are set here, around all
        # the threads, and restored once they are done
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        futures = {t.name: pool.submit(build_problem, t, stats[t.name], methods, cost, data_aware, multiple, cache)
                   for t in order}
        for future in as_completed(futures.values()):
            future.result()
            advance()
        return [futures[t.name].result() for t in targets]


def price_latency(problem: LayerProblem, timer: LayerTimer) -> None:
    """--cost latency: the layer's and its candidates' costs become seconds per run measured by
    `timer` (of those with fewer MACs than the layer); a candidate that does not run faster than
    the layer is dropped. In the calling thread: timings taken while other work runs are noise."""
    p = problem
    p.base_cost = timer.seconds(p.target, p.stats.in_shape, None)
    kept = []
    for name in dict.fromkeys(c.method for c in p.candidates if c.method is not None):
        ladder = p.of(name)
        for c, seconds in zip(ladder, latency_ladder(timer, p.target, p.stats, [c.factors for c in ladder])):
            c.cost = seconds
            if seconds < p.base_cost:
                kept.append(c)
    kept.sort(key=lambda c: (c.cost, c.error))
    p.keep.cost = p.base_cost
    p.candidates = kept + [p.keep]


class ErrorMeter:
    """Relative output errors of many factorizations of one layer on inputs with second moment S
    (what Factors.output_error computes), fast: S = R R^T once (Cholesky), so each error is
    ||(W - W') R|| / ||W R||, in float32 where tr(dW S dW^T) / tr(W S W^T) takes two float64
    products. (A 512x512x3x3 conv has 4608-wide patches: 11 GMAC per product, and a ladder has
    dozens of candidates.) A nested ladder's errors all come from one pass (`errors`)."""

    def __init__(self, layer: Layer, moment: np.ndarray, white: Whitener | None = None):
        """`white`: the moment's Whitener when the caller has it (groups == 1): its L is R. A
        (d,) moment is a diagonal one, R its square root."""
        g = layer.groups
        d = moment.shape[-1]
        self.diagonal = moment.ndim == 1
        if self.diagonal:
            self.root = (white or Whitener(moment)).l.astype(np.float32)[None]     # (1, d)
        else:
            cov = moment.reshape((g,) + moment.shape[-2:])
            roots = [white.l] if white is not None else [Whitener(c).l for c in cov]
            self.root = np.stack(roots).astype(np.float32)
        self.layer_weight, self.shape = layer.weight, (g, layer.out_channels // g, d)

    @cached_property
    def weight(self) -> np.ndarray:  # made when needed: a nested ladder's whitened errors do without
        return self.layer_weight.reshape(self.shape).astype(np.float64)

    @cached_property
    def product(self) -> np.ndarray:  # W R
        return self._times_root(self.layer_weight.reshape(self.shape).astype(np.float32))

    @cached_property
    def den(self) -> float:
        return float(np.sum(np.square(self.product), dtype=np.float64))

    def _times_root(self, m: np.ndarray) -> np.ndarray:
        return m * self.root[:, None, :] if self.diagonal else m @ self.root

    def __call__(self, factors: Factors) -> float:
        dw = (self.weight - factors.reconstruct().reshape(self.weight.shape)).astype(np.float32)
        num = float(np.sum(np.square(self._times_root(dw)), dtype=np.float64))
        return float(np.sqrt(num / self.den)) if self.den > 0 else 0.0

    def errors(self, ladder: list[Factors], truncations: object | None = None) -> list[float]:
        if not ladder:
            return []
        if truncations is None:
            return [self(f) for f in ladder]
        ranks = [f.ranks if len(f.ranks) > 1 else f.ranks[0] for f in ladder]
        if isinstance(truncations, svd.Truncations) and truncations.whitened:  # the spectrum's tail is the error
            return truncations.output_errors(ranks, self.root[0], None)
        return truncations.output_errors(ranks, self.root[0], self.product[0])


def latency_ladder(timer: LayerTimer, target: LayerTarget, stats: LayerStats, ladder: list[Factors]) -> list[float]:
    """Latency of each factorization along one method's ladder. TIMED of them, spread over the
    ladder, are measured; the rest are interpolated in MACs, which latency follows within one
    method (the chain's shape is the same, only a rank changes). The chosen ones are measured
    exactly afterwards (pipeline._confirm_latency)."""
    macs = np.array([f.macs(stats.in_spatial) for f in ladder], dtype=float)
    order = np.argsort(macs, kind="stable")
    picks = sorted({int(i) for i in np.linspace(0, len(ladder) - 1, min(TIMED, len(ladder))).round()})
    timed = np.array([timer.seconds(target, stats.in_shape, ladder[order[i]]) for i in picks])
    # noise aside, more MACs in the same chain do not run faster
    return list(np.interp(macs, macs[order[picks]], np.maximum.accumulate(timed)))

