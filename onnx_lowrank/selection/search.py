"""What every strategy shares: a choice (one candidate per layer), its total cost, and its
quality drop measured end to end in onnxruntime on the search part of the calibration set, each
measurement recorded for the report and the trade-off plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .candidates import Candidate, LayerProblem

Choice = dict[str, Candidate]  # layer name -> candidate


@dataclass(frozen=True)
class Context:
    """What a strategy reads besides the search: the model as prepared, the search part of the
    calibration set, the layers, and the --select options."""
    prepared: Any                        # onnx.ModelProto
    data: Any                            # calibration.data.CalibrationSet: the search part
    targets: list                        # graph.targets.LayerTarget, one per problem
    methods: tuple[str, ...] | None = None
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    cost: str = "macs"
    seed: int = 0


@dataclass(frozen=True)
class Selection:
    """A strategy's choice, one candidate per layer, and why each was chosen."""
    choice: Choice
    reasons: dict[str, str]


@dataclass(frozen=True)
class TracePoint:
    knob: str          # what the strategy set, e.g. "lambda=3.1e+04"
    cost_ratio: float  # whole-model cost before / after
    drop: float        # measured on the search set; beyond eps possibly a lower bound (DropMeter)
    within: bool


class SearchObserver:
    """What a study of the search may watch while a conversion runs (`compress(..., observer=)`:
    the benchmarks use it), without patching the library. The conversion calls each method as it
    goes; here they do nothing."""

    def measured(self, search: "Search", choice: Choice, model: Any, drop: float) -> None:
        """The search measured `model` (the choice built as measured: compensated per fold, a
        FoldedModel then; quantized with --quantize) on the search part: `drop`, DropMeter's value
        (beyond eps possibly a lower bound)."""

    def searched(self, search: "Search", path: list[Choice], knobs: list[str], pick: int) -> None:
        """A strategy that searches along a path of choices (auto: its lambda path, from keeping
        every layer to the cheapest of all) picked `path[pick]`. `search.written(choice)` builds
        any choice as it would be written."""


@dataclass(eq=False)
class Search:
    problems: list[LayerProblem]
    measure: Callable[[Choice], float]   # drop of the model with this choice, on the search set
    eps: float
    other_cost: float                    # cost of everything not chosen here (skipped layers)
    exact_original: bool = True          # keeping every layer is the original (drop 0); not when quantized
    trace: list[TracePoint] = field(default_factory=list)
    # the models from keeping every layer to the choice, in the strategy's own order (auto: its
    # lambda path), for the held-out part to step back along; None: verify.step_back's path
    path: list[Choice] | None = None
    observer: SearchObserver = field(default_factory=SearchObserver)
    written: Callable[[Choice], Any] | None = None  # the model as it would be written (for observers)
    _cache: dict = field(default_factory=dict)

    @property
    def base_cost(self) -> float:
        return self.other_cost + sum(p.base_cost for p in self.problems)

    def cost(self, choice: Choice) -> float:
        return self.other_cost + sum(choice[p.name].cost for p in self.problems)

    def cost_ratio(self, choice: Choice) -> float:
        cost = self.cost(choice)
        return self.base_cost / cost if cost else 1.0  # a model without MACs (nothing to factor)

    def drop(self, choice: Choice, knob: str = "") -> float:
        key = tuple(id(choice[p.name]) for p in self.problems)
        if key not in self._cache:
            unchanged = self.exact_original and all(not c.factored for c in choice.values())
            value = 0.0 if unchanged else self.measure(choice)
            self._cache[key] = value
            self.trace.append(TracePoint(knob, self.cost_ratio(choice), value, value <= self.eps))
        return self._cache[key]

    def within(self, choice: Choice, knob: str = "") -> bool:
        return self.drop(choice, knob) <= self.eps


def cheapest_within(search: Search, path: Sequence[Choice], knobs: Sequence[str]) -> int:
    """Binary search along `path` (choices from the most conservative, index 0, to the cheapest)
    for the furthest point whose measured drop is within eps, assuming the drop grows along it.
    Returns the index; 0 when nothing cheaper holds."""
    if search.within(path[-1], knobs[-1]):
        return len(path) - 1
    lo, hi = 0, len(path) - 1  # lo holds, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if search.within(path[mid], knobs[mid]):
            lo = mid
        else:
            hi = mid
    return lo
