"""Fine-tuning rounds of `convert --finetune-epochs`: Kokhazadeh et al.'s loop (fine-tune the
selection, compress further while the fine-tuned models fit eps, raise the layers their
similarity analysis names on a miss) and Yang & Liu's iterative mode (layer by layer, most
sensitive first)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from ..calibration.data import CalibrationSet
from ..decompositions import decompose
from ..errors import FinetuneDiverged
from ..metrics.confidence import Bound
from ..metrics.quality import DropMeter, drop_bound, quality
from ..runtime.sessions import costs_at, predict
from ..selection import Choice, Search
from ..selection.strategies import STRATEGIES, cosine, hessian
from .verify import assemble, export, nonfinite_samples, tuned_to_eps

FINETUNE_ROUNDS = 6  # fine-tunes after the first: compressing further, then raising ranks


@dataclass(frozen=True)
class Tuned:
    """What the rounds keep: the model, its choice, its held-out bound and each layer's reason;
    and every round tried (Report.finetune says what each entry holds)."""

    model: onnx.ModelProto
    choice: Choice
    bound: Bound
    reasons: dict[str, str]
    rounds: list[dict]


def finetune_rounds(original, prepared, problems, choice, reasons, compressed, bound, search, config, batch,
                    train, train_ref, held, held_ref, metric, level, compensation=None) -> Tuned:
    """Kokhazadeh et al.'s loop. The model selection chose (compensated on the search part, as every
    model of the rounds is, where `compensation` is given) is fine-tuned on the search part (`train`) and
    measured on the held-out part, where a model fits when the upper confidence bound of its drop
    at `level` is within eps (metrics.quality.drop_bound).
    From it (it holds without fine-tuning), and while the fine-tuned models fit eps, compress
    further: select again for twice the drop (doubled again while the selection does not change),
    fine-tune and measure. When a fine-tuned model misses eps, Kokhazadeh et al.'s similarity analysis names the
    layers to raise (each factored layer's output against the original's, both fed the original
    model's input of that layer: those under 0.92 / 0.96, else the least similar one); they step
    up 5% of their cost, and that model is fine-tuned and measured, until one fits or it would
    cost no less than the best found. (The analysis compares the candidates' factors, before
    fine-tuning: the fine-tuned chains live in the exported graph, not in the candidates.) The
    fine-tuned model of least cost within eps is kept (the model without fine-tuning, which
    holds, if none is). Ranks fixed by options get the one fine-tune. With --iterative, each
    fine-tune is Yang & Liu's layer-by-layer one."""
    from ..bridge.finetune import FinetuneOptions, finetune, same_as_rank0

    options = FinetuneOptions(epochs=config.finetune_epochs, lr=config.finetune_lr, batch_size=batch,
                              seed=config.seed)
    entries: list[dict] = []  # one per round tried
    feed = train.sample_feed()
    base = sum(c.macs for c in costs_at(prepared, feed))
    best = (compressed, choice, bound, reasons)
    order = sensitivity_order(prepared, problems, train, config.seed) if config.iterative else None

    def attempt(how: str, budget_: float | None, choice_: Choice, reasons_: dict) -> bool:
        nonlocal best
        model = assemble(prepared, problems, choice_, compensation).model  # fine-tuned from the refit chains
        untuned = quality(metric, held_ref, predict(model, held, batch), held.labels, held.indices)
        macs = sum(c.macs for c in costs_at(model, feed))  # the fine-tuned model has the same layers
        entry = {"round": how, "search_eps": budget_, "mac_ratio": base / max(macs, 1), "drop_before": untuned.drop}
        entries.append(entry)
        try:
            if order is None:
                tuned, log = finetune(model, original, train, options)
            else:
                tuned, log = finetune_iteratively(original, prepared, problems, choice_, order, train, options)
        except FinetuneDiverged:  # a miss like any other: the rounds before it, or the selection, hold
            entry.update(drop_after=None, bound_after=None, losses=[], lr=None, stopped=True, processes=None)
            same_as_rank0(False)
            return False
        outputs = predict(tuned, held, batch)
        q = drop_bound(metric, held_ref, outputs, held.labels, held.indices, held.groups, level, config.seed)
        entry.update(drop_after=q.drop, bound_after=q.upper, losses=log.losses, lr=log.lr, stopped=log.stopped,
                     processes=log.processes)
        # under torchrun every process measured the same model; rank 0's verdict binds them all,
        # so that none runs a fine-tune the others do not (they would wait for it forever)
        fits = same_as_rank0(q.upper <= config.eps and not nonfinite_samples(held_ref, outputs, len(held)))
        if fits and search.cost(choice_) <= search.cost(best[1]):
            best = (export(tuned, config), choice_, q, {k: v + " (fine-tuned)" for k, v in reasons_.items()})
        return fits

    def key(c: Choice) -> tuple:
        return tuple(id(c[p.name]) for p in problems)

    if any(c.factored for c in choice.values()):
        attempt(f"selected for eps {config.eps:g}", config.eps, choice, reasons)
    if not tuned_to_eps(config):
        return Tuned(*best, entries)
    fitted = True  # without fine-tuning, the selection holds: compress further from it in any case
    similar = None
    budget, current, current_reasons = config.eps, choice, reasons
    selected_reasons = reasons  # of the last selection: a raised layer's reason extends it
    tried, rounds, raising, raised = {key(choice)}, 0, False, {}
    while rounds < FINETUNE_ROUNDS:
        if fitted and not raising:  # compress further
            budget *= 2
            if not 0 < budget < 1:  # (eps 0: no drop to double)
                break
            meter = DropMeter(metric, train, train_ref, budget, batch)
            wider = Search(problems, lambda c: meter(assemble(prepared, problems, c, compensation, measured=True).model),
                           budget, search.other_cost)
            selected = STRATEGIES[config.select](wider, config.strategy_context(prepared, train,
                                                                                [p.target for p in problems]))
            current, current_reasons = selected.choice, selected.reasons
            selected_reasons = current_reasons
            how = f"selected for drop {budget:g}"
            if key(current) in tried:  # the same model as before: a larger budget still
                continue
        else:  # raise the layers the similarity analysis names
            raising = True
            if similar is None:
                similar = cosine.Similarity(prepared, problems, {p.name: p.target.activation for p in problems})
            current, named = cosine.raise_dissimilar(similar, problems, current)
            if not named or key(current) in tried or search.cost(current) >= search.cost(best[1]):
                break  # nothing cheaper than the best found is left to try
            for name in named:
                raised[name] = raised.get(name, 0) + 1
            current_reasons = {
                k: v if k not in raised else
                f"{v} (raised {5 * raised[k]}% of its cost by the cosine analysis)" if current[k].factored
                else "kept: raised to full cost by the cosine analysis"
                for k, v in selected_reasons.items()}
            how = f"raised {len(named)} layer(s) 5% (cosine)"
            budget = None
        tried.add(key(current))
        rounds += 1
        fitted = attempt(how, budget, current, current_reasons)
        if fitted and raising:
            break
    return Tuned(*best, entries)


def sensitivity_order(prepared, problems, data: CalibrationSet, seed: int) -> list[str]:
    """Yang & Liu's order for the iterative mode: the layers by decreasing Hessian trace of the loss with
    respect to their weights (Hutchinson's estimate through the PyTorch bridge, as --select
    hessian measures it), the most sensitive compressed first."""
    traces = hessian.layer_traces(prepared, [p.name for p in problems], data, seed)
    return sorted(traces, key=lambda name: -traces[name])


def finetune_iteratively(original, prepared, problems, choice: Choice, order: list[str], data, options):
    """Yang & Liu's iterative mode on `choice`: its factored layers in sensitivity order, one at a time,
    each decomposed again at its chosen method and ranks from its weight as fine-tuned so far
    (data-aware with its captured input moment, like the candidate), a fine-tune after each."""
    from ..bridge.finetune import finetune_iteratively

    by_name = {p.name: p for p in problems}

    def refactor(p, c):
        return lambda layer: decompose(replace(layer, input_cov=p.layer.input_cov), c.method, rank=c.ranks)

    steps = [(name, refactor(by_name[name], choice[name])) for name in order if choice[name].factored]
    return finetune_iteratively(prepared, original, steps, data, options)

