"""The result as written, and the check that it holds: a choice of candidates built into a model
(with the touches a deployment wants), the upper confidence bound of its drop on the held-out
part, and the steps back along the path towards keeping every layer when that bound exceeds eps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..compensation.refit import Compensation
from ..config import CompressConfig
from ..errors import InvalidModel, first_line
from ..graph import replace_layers
from ..graph.export import fp16_weights, merge_linear_pairs
from ..graph.index import FLOAT_TYPES
from ..graph.prepare import infer_shapes
from ..graph.rewrite import Chain
from ..metrics.confidence import Bound
from ..metrics.quality import drop_bound
from ..quantization.int8 import INT8_MAC_COST, Quantizer, Unit, unit_errors, units
from ..runtime.sessions import FoldedModel, offline_optimized, predict
from ..selection import Choice
from ..selection.candidates import cost_of


@dataclass
class Assembled:
    """A model built from a choice, and the chains the rewrite wrote into it (per factored target)."""

    model: onnx.ModelProto | FoldedModel
    chains: dict[str, Chain]

    def units(self, feed: dict[str, np.ndarray] | None = None) -> list[Unit]:
        """Its quantization units (quantization.int8.units)."""
        first = self.model.models[0] if isinstance(self.model, FoldedModel) else self.model
        return units(first, self.chains, feed)


def assemble(prepared: onnx.ModelProto, problems, choice: Choice, compensation: Compensation | None = None, *,
             measured: bool = False, config: CompressConfig | None = None, quantizer: Quantizer | None = None,
             floats: frozenset[str] = frozenset(), infer: bool = True) -> Assembled:
    """The one way a model is built from `choice`: the prepared model with the chosen candidates.
    With `compensation` their chains' last steps are refit to the original's outputs
    (compensation/refit.py): on the whole search part for the model written, or, `measured`, as
    two refits each answering for the fold it was not fitted on (a FoldedModel, not
    shape-inferred): what the drop of a refit model is measured on. With `config`, the touches
    of the file written (export); with `quantizer`, quantized but for the units named in `floats`."""
    chosen = [(p.target, choice[p.name].factors) for p in problems if choice[p.name].factored]
    rewritten = replace_layers(prepared, chosen, infer=False)
    model, chains = rewritten.model, rewritten.chains
    if compensation is not None and chosen:
        model = compensation.crossfit(model, chains) if measured else compensation.refit(model, chains)
    if infer and not measured:
        model = infer_shapes(model)
    if config is not None:
        model = each(model, lambda m: export(m, config))
    if quantizer is not None:
        built = Assembled(model, chains)
        keep = [n for u in built.units() if u.name in floats for n in u.nodes]
        model = each(model, lambda m: quantizer(m, keep))
    return Assembled(model, chains)


def each(model: onnx.ModelProto | FoldedModel, f: Callable[[onnx.ModelProto], onnx.ModelProto]):
    """`f` applied to a model, or to each model of a FoldedModel."""
    return model.map(f) if isinstance(model, FoldedModel) else f(model)


def written(prepared: onnx.ModelProto, problems, choice: Choice, config: CompressConfig,
            compensation: Compensation | None, quantizer: Quantizer | None = None,
            floats: frozenset[str] = frozenset(), infer: bool = True) -> onnx.ModelProto:
    """The model `choice` makes as it is written: built (compensated on the whole search part),
    exported, and with `quantizer` quantized but for the units named in `floats`."""
    return assemble(prepared, problems, choice, compensation, config=config, quantizer=quantizer, floats=floats,
                    infer=infer).model


def export(model: onnx.ModelProto, config: CompressConfig) -> onnx.ModelProto:
    """The touches a deployment wants on the file written (graph/export.py)."""
    if config.merge:
        model, _ = merge_linear_pairs(model)
    if config.optimize:
        model = offline_optimized(model)
    if config.fp16:  # after optimizing, whose constant folding would turn the weights back to float32
        model = fp16_weights(model)
    return model


def tuned_to_eps(config: CompressConfig) -> bool:
    """Whether the strategy chose the ranks to fit eps (else the user or VBMF fixed them)."""
    fixed = (config.select == "vbmf" or config.rank is not None or config.ratio is not None
             or config.energy is not None)
    return not fixed


SEQUENCE = 8  # models of the path the held-out part measures at most (verify_choice)


@dataclass
class Verified:
    """The model to write and what the held-out part says of it."""

    model: onnx.ModelProto
    choice: Choice
    floats: frozenset[str] | None  # units kept in float (None: not quantized)
    outputs: list[np.ndarray]      # its outputs on the held-out part
    bound: Bound
    steps: int                     # how far back along the path from the choice
    tested: int                    # models of the path measured


def verify_choice(prepared, problems, choice: Choice, metric, data, reference, config, back_off: bool,
                  level: float, confirm: Callable[[Choice], Choice] | None = None,
                  quantizer: Quantizer | None = None, feed: dict[str, np.ndarray] | None = None,
                  compensation: Compensation | None = None, way_back: list[Choice] | None = None,
                  batch: int | None = None) -> Verified:
    """What is written, decided on `data`, the held-out part: samples that no fitting (statistics,
    compensation) and no choice touched. A model holds when the upper confidence bound of its drop
    there, at `level`, is within eps (metrics.quality.drop_bound) and it outputs no NaN or Inf where the
    original does not.

    When the ranks were chosen to fit eps (`back_off`), the steps from the choice back to keeping
    every layer form a path (`way_back`, the strategy's own from keeping every layer to the choice:
    auto's lambda path; else a step moves the factored layer with the largest error to its next
    more accurate candidate; with `quantizer` it may instead keep a unit in float, joint_step), and
    up to SEQUENCE of its models, spaced evenly in log cost from the safest to the choice, are
    measured in that order until one fails: the last that held is written (keeping every layer,
    the original, when none does). Tested in a fixed order and stopped at the first failure, the
    chance that any model which exceeds eps is passed stays at 1 - level whatever the number
    tested (a fixed-sequence test; Learn then Test, Angelopoulos et al. 2021). `confirm` checks
    each choice measured (--cost latency)."""

    def model_of(c: Choice, floats: frozenset[str] | None, infer: bool) -> onnx.ModelProto:
        return written(prepared, problems, c, config, compensation, quantizer if floats is not None else None,
                       floats or frozenset(), infer)

    def measured(state) -> tuple[onnx.ModelProto, list[np.ndarray], Bound, bool]:
        model = model_of(*state, infer=False)  # no shape inference while deciding: once, on the model kept
        outputs = predict(model, data, batch or config.batch_size)
        bound = drop_bound(metric, reference, outputs, data.labels, data.indices, data.groups, level, config.seed)
        finite = not nonfinite_samples(reference, outputs, len(data))
        return model, outputs, bound, finite and bound.upper <= config.eps

    found: list[Unit] = []  # with `quantizer`: the units of the choice's model
    path = [(dict(choice), frozenset() if quantizer is not None else None)]
    if confirm is not None:
        path[0] = (confirm(path[0][0]), path[0][1])
    if back_off:
        if quantizer is None and way_back is not None:
            path += [(dict(c), None) for c in reversed(way_back[:-1])]
            if any(c.factored for c in path[-1][0].values()):
                path.append(({p.name: p.keep for p in problems}, None))
        elif quantizer is None:
            while any(c.factored for c in path[-1][0].values()):
                path.append((step_back(problems, path[-1][0]), None))
        else:
            built = assemble(prepared, problems, path[0][0], compensation, config=config)
            float_model = built.model
            found[:] = built.units(feed)
            errors = unit_errors(float_model, quantizer(float_model), found, quantizer.probe)
            while (state := joint_step(problems, *path[-1], found, errors)) is not None:
                path.append(state)
            path.append(({p.name: p.keep for p in problems}, None))

    def cost(state) -> float:  # int8 MACs at INT8_MAC_COST of a float one (the units of the choice)
        choice_, floats = state
        int8 = 0.0 if floats is None else sum(u.macs for u in found if u.name not in floats)
        return sum(choice_[p.name].cost for p in problems) - (1 - INT8_MAC_COST) * int8

    order = _sequence([cost(state) for state in path]) if back_off else [0]
    kept, tested = None, 0
    for k in order:
        if confirm is not None:
            path[k] = (confirm(path[k][0]), path[k][1])
        result = measured(path[k])
        tested += 1
        if not result[3] and back_off:
            break
        kept = (k, result)
    if kept is None:  # nothing held: every layer kept, the original, whose drop is 0 (not a bound's guess)
        k = len(path) - 1
        model, outputs, bound, _ = measured(path[k])
        kept = (k, (model, outputs, Bound(bound.drop, max(bound.drop, 0.0), level, bound.samples, bound.groups,
                                          bound.method), True))
    k, (_, outputs, bound, _) = kept
    choice, floats = path[k]
    return Verified(model_of(choice, floats, infer=True), choice, floats, outputs, bound, k, tested)


def _sequence(costs: list[float]) -> list[int]:
    """Positions on the path (0: the choice, last: keep every layer; `costs` of each) to measure,
    safest first: the safest model at each of SEQUENCE costs spaced evenly in log cost from
    keeping every layer to the choice, the choice last."""
    full, chosen = costs[-1], costs[0]
    if len(costs) == 1 or chosen >= full:
        return [0]
    ratios = [full / max(c, 1e-300) for c in costs]
    order: list[int] = []
    for j in range(1, SEQUENCE):
        target = ratios[0] ** (j / SEQUENCE)
        # the safest model reaching the target: the last on the path whose ratio is at least it
        k = max(i for i, r in enumerate(ratios) if r >= target * (1 - 1e-9))
        if k not in order and k != len(costs) - 1:
            order.append(k)
    return sorted(order, reverse=True) + [0] * (0 not in order)


def joint_step(problems, choice: Choice, floats: frozenset[str], found: list[Unit], errors: dict[str, float]):
    """One step back on the quantized path: a rank step (step_back) or a unit kept in float,
    whichever removes more error per MAC it puts back (an int8 MAC counted as INT8_MAC_COST of a
    float one). A rank step removes its layer's error drop (candidate errors); keeping a unit in
    float, its own quantization error (unit_errors). None when nothing is left to step."""
    moves = []
    if any(c.factored for c in choice.values()):
        stepped = step_back(problems, choice)
        p = next(p for p in problems if stepped[p.name] is not choice[p.name])
        added = _macs(p, stepped[p.name]) - _macs(p, choice[p.name])
        weight = 1.0 if p.name in floats else INT8_MAC_COST
        moves.append(((choice[p.name].error - stepped[p.name].error) / max(added * weight, 1.0),
                      (stepped, floats)))
    for u in found:
        if u.name not in floats:
            moves.append((errors.get(u.name, 0.0) / max(u.macs * (1 - INT8_MAC_COST), 1.0),
                          (choice, floats | {u.name})))
    if not moves:
        return None
    return max(moves, key=lambda m: m[0])[1]


def _macs(problem, candidate) -> float:
    return cost_of(problem.target.layer, candidate.factors, problem.stats.in_spatial, "macs")


def nonfinite(outputs: list[np.ndarray], samples: int) -> np.ndarray:
    """Per sample: whether some floating-point output holds a NaN or Inf (outputs that are not one
    row per sample, like a Shape, say nothing about a sample)."""
    bad = np.zeros(samples, dtype=bool)
    for a in outputs:
        if a.ndim and len(a) == samples and np.issubdtype(a.dtype, np.floating):
            bad |= ~np.isfinite(a.reshape(samples, -1)).all(axis=1)
    return bad


def nonfinite_samples(reference: list[np.ndarray], outputs: list[np.ndarray], samples: int) -> int:
    """Samples with a NaN or Inf in some output where the reference has none."""
    return int(np.sum(nonfinite(outputs, samples) & ~nonfinite(reference, samples)))


def require_finite(model: onnx.ModelProto, search_ref: list[np.ndarray], held_ref: list[np.ndarray],
                   search: int, held: int) -> None:
    """The original's outputs must be finite: no quality drop can be measured against NaN."""
    bad = int(nonfinite(search_ref, search).sum() + nonfinite(held_ref, held).sum())
    if bad:
        broken = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES
                  and not np.all(np.isfinite(numpy_helper.to_array(t)))]
        cause = f" (weights with NaN/Inf: {', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''})" if broken else ""
        raise InvalidModel(f"the model itself outputs NaN or Inf on {bad} of {search + held} calibration "
                           f"samples{cause}; there is no quality to keep")


def step_back(problems, choice: Choice) -> Choice:
    """The factored layer with the largest error to its next more accurate candidate."""
    choice = dict(choice)
    worst = max((p for p in problems if choice[p.name].factored), key=lambda p: choice[p.name].error)
    current = choice[worst.name]
    better = [c for c in worst.candidates if c.error < current.error and c.method in (current.method, None)]
    choice[worst.name] = min(better, key=lambda c: c.cost) if better else worst.keep
    return choice


def check_model(compressed: onnx.ModelProto, prepared: onnx.ModelProto) -> None:
    """onnx's full check of the model to be written. Where it fails, and fails on the prepared
    original too, the fault is the model's own (an output declared with the wrong shape, which
    onnxruntime runs regardless): one line that says so."""
    try:
        onnx.checker.check_model(compressed, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        try:
            onnx.checker.check_model(prepared, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            raise InvalidModel(f"the model fails onnx's full check, so its compressed form would too: "
                               f"{first_line(e)}") from None
        raise
