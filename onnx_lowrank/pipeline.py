"""compress(): load, prepare, find targets, calibrate, build candidates, select ranks, rewrite,
verify — the stages of DESIGN.md in order."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .calibration.capture import activation_name, capture
from .calibration.data import CalibrationError, CalibrationSet, load_calibration, model_inputs
from .config import CompressConfig
from .decompositions import decompose, get_method, reason_not_applicable
from .errors import FinetuneDiverged, InvalidModel, OnnxLowrankError, OutputError, VerificationError
from .graph import find_targets, load_model, node_costs, prepare, replace_layers, save_model
from .graph.export import fp16_weights, merge_linear_pairs, ort_optimized
from .graph.index import FLOAT_TYPES, WEIGHT_TYPES
from .graph.targets import LayerTarget, Skipped
from .latency import LayerTimer, interleaved, runtime_session, time_session
from .quality import RUNTIME_ERRORS, DropMeter, predict, quality, resolve_metric, runtime_message, session
from .report import LayerReport, Report
from .selection import Choice, Search
from .selection.candidates import build_problems, price_latency
from .selection import auto, cosine, energy, fixed, hessian, vbmf
from .selection.sensitivity import sensitivities

Progress = Callable[[str, int | None], Callable[[], None]]  # stage name, steps (None: open-ended) -> advance()


def _quiet_progress(stage: str, total: int) -> Callable[[], None]:
    return lambda: None


@contextmanager
def _timed(report: Report, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    report.timings[stage] = report.timings.get(stage, 0.0) + time.perf_counter() - start


def _warn(report: Report, message: str) -> None:
    """`message` as a UserWarning at compress's caller, and in the report."""
    warnings.warn(message, stacklevel=3)
    report.warnings.append(message)


def compress(model: onnx.ModelProto | str | os.PathLike, config: CompressConfig | None = None,
             calibration: Any = None, labels: Any = None,
             progress: Progress = _quiet_progress) -> tuple[onnx.ModelProto, Report]:
    """Compress `model` within `config.eps`. `calibration`: an .npz/.npy path, a folder of
    images, an object with get_next() (onnxruntime's CalibrationDataReader), or None for
    synthetic inputs (with a warning). `labels`: an .npy path, an npz key, or an array."""
    config = config or CompressConfig()
    config.validate()
    report = Report(config.eps, config.metric, config.select, config.cost, config.data_aware, {})

    with _timed(report, "load"):
        original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
        report.file_size_before = original.ByteSize()
        try:  # what onnxruntime cannot run, we cannot calibrate or verify
            original_session = session(original)
        except RUNTIME_ERRORS as e:
            where = "" if isinstance(model, onnx.ModelProto) else f"{model}: "
            raise InvalidModel(f"{where}onnxruntime cannot load the model: {runtime_message(e)}") from None
        prepared = prepare(original)
        targets, skipped = find_targets(prepared)
        targets, skipped = _exclude(targets, skipped, config.exclude)
        targets, skipped = _factorable(targets, skipped, config.methods or auto_methods())
    report.skipped = [{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in skipped]
    if not targets:
        message = "nothing to factor: the model has no Conv, Gemm or MatMul layer" + (
            f" that can be ({len(skipped)} skipped; the report says why)" if skipped else "")
        _warn(report, message)

    with _timed(report, "calibrate"):
        data = load_calibration(calibration, prepared, labels, config.image, config.seed)
        if data.synthetic:
            message = ("no calibration data: ranks are chosen on synthetic N(0,1) inputs, which say little "
                       "about real ones; give --calib for a result you can trust")
            _warn(report, message)
        search_set, held = data.split(config.holdout, config.seed)
        report.calibration = {"source": data.source, "samples": len(data), "search": len(search_set),
                              "heldout": len(held), "synthetic": data.synthetic, "labels": data.labels is not None}
        advance = progress("capture", 1)
        try:
            stats, search_ref = capture(prepared, targets, search_set, config.batch_size, seed=config.seed)
            held_ref = predict(original_session, held, config.batch_size)
        except RUNTIME_ERRORS as e:
            raise CalibrationError("onnxruntime failed running the model on the calibration data: "
                                   f"{runtime_message(e)}") from None
        advance()
        _require_finite(prepared, search_ref, held_ref, len(search_set), len(held))
        metric = resolve_metric(config.metric, search_ref, data.labels)
        report.metric = metric

    timer = None
    if config.cost == "latency":
        timer = LayerTimer(prepared, config.provider, config.threads, config.latency_batch)
    with _timed(report, "decompose"):
        problems = build_problems(targets, stats, config.methods or auto_methods(),
                                  "macs" if timer is not None else config.cost, config.data_aware,
                                  config.rank_multiple, config.jobs, progress("decompose", len(targets)))
        if timer is not None:
            advance = progress("time", len(problems))
            for p in problems:
                price_latency(p, timer)
                advance()

    advance_search = progress("search", None)

    meter = DropMeter(metric, search_set, search_ref, config.eps, config.batch_size)

    def measure(choice: Choice) -> float:
        model_ = _build(prepared, problems, choice, infer=False)
        advance_search()
        return meter(model_)

    shapes = {name: (1,) + array.shape[1:] for name, array in data.inputs.items()}
    costs = node_costs(prepared, shapes)
    if timer is not None:
        feed = {k: np.repeat(v[:1], config.latency_batch, axis=0) for k, v in data.inputs.items()}
        total = time_session(runtime_session(prepared, config.provider, config.threads), feed).median
    else:
        total = sum(c.macs if config.cost == "macs" else c.params for c in costs)
    # the rest of the model (skipped layers, activations, ...); latencies measured apart do not
    # add up exactly, so never below zero
    search = Search(problems, measure, config.eps, other_cost=max(total - sum(p.base_cost for p in problems), 0.0))

    with _timed(report, "select"):
        choice, reasons = _select(config, search, prepared, search_set, targets)
        if timer is not None:
            choice = _confirm_latency(timer, problems, choice, reasons)
        report.search_drop = search.drop(choice)

    with _timed(report, "verify"):
        before_backoff = choice
        confirm = (lambda c: _confirm_latency(timer, problems, c, reasons)) if timer is not None else None
        compressed, choice, drop_q, steps, nonfinite = _verify_heldout(
            prepared, problems, choice, metric, held, held_ref, config,
            back_off=config.verify and _tuned_to_eps(config), confirm=confirm)
        if timer is not None:
            timer.save()
        report.backed_off = steps
        failures, notes = [], []  # failures fail verification; fixed ranks promised nothing
        if nonfinite:
            failures.append(f"the compressed model outputs NaN or Inf on {nonfinite} of {len(held)} held-out "
                            "samples where the original does not")
        if drop_q.drop > config.eps:
            exceeds = f"the held-out {metric} drop {drop_q.drop:.4f} exceeds eps {config.eps}"
            if not _tuned_to_eps(config):
                notes.append(f"{exceeds}: the ranks were fixed by --select {config.select} options, "
                             "not chosen to fit eps")
            else:
                failures.append(exceeds + ("" if config.verify else " (not stepped back: --no-verify)"))
        if failures and config.verify:
            raise VerificationError(f"{failures[0]}; nothing was written (--no-verify writes it anyway)")
        for message in failures + notes:
            _warn(report, message)
        for p in problems:
            if choice[p.name] is not before_backoff[p.name]:
                reasons[p.name] += " (backed off: the held-out drop exceeded eps)"
        before_q = quality(metric, held_ref, held_ref, held.labels)
        report.quality_before, report.quality_after, report.drop = before_q.value, drop_q.value, drop_q.drop
        onnx.checker.check_model(compressed, full_check=True)
        if timer is not None:
            sessions = [runtime_session(m, config.provider, config.threads) for m in (prepared, compressed)]
            report.latency_before, report.latency_after = (float(np.median(t)) for t in interleaved(sessions, feed))

    if config.finetune_epochs:
        with _timed(report, "finetune"):
            compressed, choice, drop_q, reasons = _finetune_rounds(
                original, prepared, problems, choice, reasons, compressed, drop_q, search, config,
                search_set, search_ref, held, held_ref, metric, report)
            stopped = sum(r["stopped"] for r in report.finetune)
            if stopped:
                message = (f"fine-tuning stopped early in {stopped} of {len(report.finetune)} round(s): no learning "
                           f"rate from --finetune-lr {config.finetune_lr:g} down to a thousandth of it lowered the "
                           "training loss (or the model diverged)")
                _warn(report, message)
            report.quality_after, report.drop = drop_q.value, drop_q.drop
            onnx.checker.check_model(compressed, full_check=True)

    report.trace = search.trace
    report.layers = [_layer_report(p, choice[p.name], reasons[p.name], timer is not None) for p in problems]
    after = node_costs(compressed, shapes)
    report.macs_before, report.macs_after = sum(c.macs for c in costs), sum(c.macs for c in after)
    report.params_before, report.params_after = model_params(prepared), model_params(compressed)
    report.file_size_after = compressed.ByteSize()
    return compressed, report


def compress_file(src: str | os.PathLike, dst: str | os.PathLike, config: CompressConfig | None = None,
                  calibration: Any = None, labels: Any = None, report_path: str | os.PathLike | None = None,
                  progress: Progress = _quiet_progress, plots: str | os.PathLike | None = None) -> Report:
    """Path to path. `src` and the calibration files are never modified: an output naming one of
    them is refused before any work. The model, the report and the plots are written all or
    nothing, each file atomically, by rank 0 of a torchrun job only."""
    from .bridge.finetune import process_rank

    _check_paths(src, dst, calibration, labels, report_path)
    out, report = compress(src, config, calibration, labels, progress)
    if process_rank() != 0:  # under torchrun (--finetune-epochs): every process holds the same model
        return report
    written: list[Path] = []
    with _interrupts_ignored():
        try:  # all or nothing: a failure writing the report or the plots takes back the model
            save_model(out, dst)
            written.append(Path(dst))
            report.file_size_after = Path(dst).stat().st_size
            report.file_size_before = Path(src).stat().st_size
            if report_path is not None:
                report.write_json(report_path)
                written.append(Path(report_path))
            if plots is not None:  # last: on a failure it removes what it wrote itself
                report.plots(plots)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return report


def _check_paths(src, dst, calibration, labels, report_path, teacher=None) -> None:
    """Before any work: no output may name an input (the model, its external data, the calibration
    data, the labels, a fine-tune's teacher), directly or through a symbolic link, nor the other
    output; each output's folder must exist. (A hard link to an input is safe: outputs are renamed into place, which
    replaces the link, not the bytes it shares.)"""
    inputs = [("the input model", src)] + [("the input model's external data", p) for p in _external_data(src)]
    if isinstance(calibration, (str, os.PathLike)):
        inputs.append(("the calibration data", calibration))
    if isinstance(labels, (str, os.PathLike)) and Path(labels).is_file():  # else an npz key
        inputs.append(("the labels", labels))
    if teacher is not None:
        inputs.append(("the teacher", teacher))
    outputs = [("the output", dst)] + ([("the report", report_path)] if report_path is not None else [])
    for out_what, out in outputs:
        for in_what, path in inputs:
            if Path(out).resolve() == Path(path).resolve():
                raise OnnxLowrankError(f"{out}: {out_what} would overwrite {in_what}; choose another path")
        folder = Path(out).resolve().parent
        if not folder.is_dir():
            raise OutputError(f"{out}: the folder {folder} does not exist")
    if report_path is not None and Path(dst).resolve() == Path(report_path).resolve():
        raise OnnxLowrankError(f"{report_path}: the report and the output model are the same file")


def _external_data(src) -> list[Path]:
    """The files an ONNX model keeps its external tensors in."""
    if not Path(src).is_file():  # a FIFO would block the read; load_model says what is wrong
        return []
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception:  # not a model we can read: load_model says why, in its own words
        return []
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return [Path(src).parent / location for location in sorted(locations)]


@dataclass
class FinetuneResult:
    metric: str
    quality_before: float   # the student against the teacher (or the labels), held-out, before
    quality_after: float    # ... and after fine-tuning
    teacher_quality: float
    losses: list[float]
    processes: int
    parity: float
    lr: float               # the rate training ended at: below --lr where an epoch raised the loss
    stopped: bool           # before its epochs: no rate down to a thousandth of --lr lowered the loss


def finetune_file(student: str | os.PathLike, dst: str | os.PathLike, teacher: str | os.PathLike,
                  calibration: Any, labels: Any = None, options: Any = None, holdout: float = 0.3,
                  seed: int = 0, metric: str = "auto") -> FinetuneResult:
    """Fine-tune the compressed model `student` towards the original `teacher` on the search part of
    `calibration` and write it to `dst` (on rank 0 of a torchrun job only); the held-out part
    measures it before and after. Neither input is modified."""
    from .bridge.finetune import FinetuneOptions, finetune, process_rank

    options = options or FinetuneOptions()
    options.validate()
    _check_paths(student, dst, calibration, labels, None, teacher)
    student_model, teacher_model = load_model(student), load_model(teacher)
    interface = [[(s.name, s.dtype) for s in model_inputs(m)] for m in (student_model, teacher_model)]
    if interface[0] != interface[1]:
        raise OnnxLowrankError(f"{teacher}: the teacher's inputs {interface[1]} are not the student's {interface[0]}")
    data = load_calibration(calibration, student_model, labels, seed=seed)
    train, held = data.split(holdout, seed)
    held_ref = predict(teacher_model, held)
    metric = resolve_metric(metric, held_ref, data.labels)
    before = quality(metric, held_ref, predict(student_model, held), held.labels)
    tuned, log = finetune(student_model, teacher_model, train, options)
    after = quality(metric, held_ref, predict(tuned, held), held.labels)
    if process_rank() == 0:
        with _interrupts_ignored():
            save_model(tuned, dst)
    return FinetuneResult(metric, before.value, after.value, quality(metric, held_ref, held_ref, held.labels).value,
                          log.losses, log.processes, log.parity, log.lr, log.stopped)


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ctrl-C is ignored while the output files are put in place: it could otherwise fall between
    a rename and the bookkeeping after it. The conversion is done by then, so it completes.
    (Signal handlers belong to the main thread; elsewhere, nothing to do.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def auto_methods() -> tuple[str, ...]:
    from .selection.candidates import AUTO_METHODS

    return AUTO_METHODS


def model_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant that holds weights (index.WEIGHT_TYPES: floating
    point and quantized integers; not shapes, axes or indices)."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in WEIGHT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in WEIGHT_TYPES:
                    total += int(np.prod(a.t.dims))
                elif a.name == "value_floats":
                    total += len(a.floats)
                elif a.name == "value_float":
                    total += 1
    return total


def _exclude(targets: list[LayerTarget], skipped: list[Skipped], exclude) -> tuple[list, list]:
    if not exclude:
        return targets, skipped
    kept, out = [], list(skipped)
    for t in targets:
        if t.name in exclude or t.op_type in exclude:
            out.append(Skipped(t.name, t.op_type, "excluded by --exclude"))
        else:
            kept.append(t)
    return kept, out


def _factorable(targets: list[LayerTarget], skipped: list[Skipped], methods) -> tuple[list, list]:
    """Targets no method can factor (a depthwise conv, a 1x1 conv for conv-only methods) become
    skips with the first method's reason: no need to capture their inputs."""
    kept, out = [], list(skipped)
    for t in targets:
        reasons = [reason_not_applicable(t.layer, m) for m in methods]
        if all(reasons):
            out.append(Skipped(t.name, t.op_type, reasons[0]))
        else:
            kept.append(t)
    return kept, out


def _select(config: CompressConfig, search: Search, prepared: onnx.ModelProto, data: CalibrationSet,
            targets: list[LayerTarget]) -> tuple[Choice, dict[str, str]]:
    if config.select == "auto":
        return auto.select(search, sensitivities(search.problems, prepared, data))
    if config.select == "rank":
        return fixed.select(search, config.methods, config.rank, config.ratio, config.cost)
    if config.select == "energy":
        return energy.select(search, config.energy)
    if config.select == "vbmf":
        return vbmf.select(search, config.methods, config.cost)
    if config.select == "cosine":
        inputs = {t.name: activation_name(t) for t in targets}
        return cosine.select(search, prepared, config.methods, inputs)
    return hessian.select(search, prepared, data, config.methods, config.seed)


FINETUNE_ROUNDS = 6  # fine-tunes after the first: compressing further, then raising ranks


def _finetune_rounds(original, prepared, problems, choice, reasons, compressed, drop_q, search, config,
                     train, train_ref, held, held_ref, metric, report):
    """004's loop. The model selection chose is fine-tuned and measured on the held-out part.
    From it (it holds without fine-tuning), and while the fine-tuned models fit eps, compress
    further: select again for twice the drop (doubled again while the selection does not change),
    fine-tune and measure. When a fine-tuned model misses eps, 004's similarity analysis names the
    layers to raise (each factored layer's output against the original's, both fed the original
    model's input of that layer: those under 0.92 / 0.96, else the least similar one); they step
    up 5% of their cost, and that model is fine-tuned and measured, until one fits or it would
    cost no less than the best found. (The analysis compares the candidates' factors, before
    fine-tuning: the fine-tuned chains live in the exported graph, not in the candidates.) The
    fine-tuned model of least cost within eps is kept (the model without fine-tuning, which
    holds, if none is). Ranks fixed by options get the one fine-tune. With --iterative, each
    fine-tune is 000's layer-by-layer one."""
    from .bridge.finetune import FinetuneOptions, finetune, same_as_rank0

    options = FinetuneOptions(epochs=config.finetune_epochs, lr=config.finetune_lr,
                              batch_size=config.batch_size, seed=config.seed)
    shapes = {name: (1,) + array.shape[1:] for name, array in train.inputs.items()}
    base = sum(c.macs for c in node_costs(prepared, shapes))
    best = (compressed, choice, drop_q, reasons)
    order = _sensitivity_order(prepared, problems, train, config.seed) if config.iterative else None

    def attempt(how: str, budget_: float | None, choice_: Choice, reasons_: dict) -> bool:
        nonlocal best
        model = _build(prepared, problems, choice_)
        untuned = quality(metric, held_ref, predict(model, held, config.batch_size), held.labels)
        macs = sum(c.macs for c in node_costs(model, shapes))  # the fine-tuned model has the same layers
        entry = {"round": how, "search_eps": budget_, "mac_ratio": base / max(macs, 1), "drop_before": untuned.drop}
        report.finetune.append(entry)
        try:
            if order is None:
                tuned, log = finetune(model, original, train, options)
            else:
                tuned, log = _finetune_iteratively(original, prepared, problems, choice_, order, train, options)
        except FinetuneDiverged:  # a miss like any other: the rounds before it, or the selection, hold
            entry.update(drop_after=None, losses=[], lr=None, stopped=True, processes=None)
            same_as_rank0(False)
            return False
        outputs = predict(tuned, held, config.batch_size)
        q = quality(metric, held_ref, outputs, held.labels)
        entry.update(drop_after=q.drop, losses=log.losses, lr=log.lr, stopped=log.stopped, processes=log.processes)
        # under torchrun every process measured the same model; rank 0's verdict binds them all,
        # so that none runs a fine-tune the others do not (they would wait for it forever)
        fits = same_as_rank0(q.drop <= config.eps and not _nonfinite_samples(held_ref, outputs, len(held)))
        if fits and search.cost(choice_) <= search.cost(best[1]):
            best = (_export(tuned, config), choice_, q, {k: v + " (fine-tuned)" for k, v in reasons_.items()})
        return fits

    def key(c: Choice) -> tuple:
        return tuple(id(c[p.name]) for p in problems)

    if any(c.factors is not None for c in choice.values()):
        attempt(f"selected for eps {config.eps:g}", config.eps, choice, reasons)
    if not _tuned_to_eps(config):
        return best
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
            meter = DropMeter(metric, train, train_ref, budget, config.batch_size)
            wider = Search(problems, lambda c: meter(_build(prepared, problems, c, infer=False)), budget,
                           search.other_cost)
            current, current_reasons = _select(config, wider, prepared, train, [p.target for p in problems])
            selected_reasons = current_reasons
            how = f"selected for drop {budget:g}"
            if key(current) in tried:  # the same model as before: a larger budget still
                continue
        else:  # raise the layers the similarity analysis names
            raising = True
            if similar is None:
                similar = cosine.Similarity(prepared, problems, {p.name: activation_name(p.target) for p in problems})
            current, named = cosine.raise_dissimilar(similar, problems, current)
            if not named or key(current) in tried or search.cost(current) >= search.cost(best[1]):
                break  # nothing cheaper than the best found is left to try
            for name in named:
                raised[name] = raised.get(name, 0) + 1
            current_reasons = {
                k: v if k not in raised else
                f"{v} (raised {5 * raised[k]}% of its cost by the cosine analysis)" if current[k].factors is not None
                else "kept: raised to full cost by the cosine analysis"
                for k, v in selected_reasons.items()}
            how = f"raised {len(named)} layer(s) 5% (cosine)"
            budget = None
        tried.add(key(current))
        rounds += 1
        fitted = attempt(how, budget, current, current_reasons)
        if fitted and raising:
            break
    return best


def _sensitivity_order(prepared, problems, data: CalibrationSet, seed: int) -> list[str]:
    """000's order for the iterative mode: the layers by decreasing Hessian trace of the loss with
    respect to their weights (Hutchinson's estimate through the PyTorch bridge, as --select
    hessian measures it), the most sensitive compressed first."""
    traces = hessian.layer_traces(prepared, [p.name for p in problems], data, seed)
    return sorted(traces, key=lambda name: -traces[name])


def _finetune_iteratively(original, prepared, problems, choice: Choice, order: list[str], data, options):
    """000's iterative mode on `choice`: its factored layers in sensitivity order, one at a time,
    each decomposed again at its chosen method and ranks from its weight as fine-tuned so far
    (data-aware with its captured input moment, like the candidate), a fine-tune after each."""
    from .bridge.finetune import finetune_iteratively

    by_name = {p.name: p for p in problems}

    def refactor(p, c):
        if "rank" not in get_method(c.method).options():
            # tr is chosen by error, not by ranks: its factors of the original weight, so what the
            # steps before trained into this layer is not kept
            return lambda layer: c.factors
        return lambda layer: decompose(replace(layer, input_cov=p.layer.input_cov), c.method, rank=c.ranks)

    steps = [(name, refactor(by_name[name], choice[name])) for name in order if choice[name].factors is not None]
    return finetune_iteratively(prepared, original, steps, data, options)


def _build(prepared: onnx.ModelProto, problems, choice: Choice, infer: bool = True) -> onnx.ModelProto:
    chosen = [(p.target, choice[p.name].factors) for p in problems if choice[p.name].factors is not None]
    return replace_layers(prepared, chosen, infer)


def _export(model: onnx.ModelProto, config: CompressConfig) -> onnx.ModelProto:
    """The touches a deployment wants on the file written (graph/export.py)."""
    if config.merge:
        model, _ = merge_linear_pairs(model)
    if config.optimize:
        model = ort_optimized(model)
    if config.fp16:  # after optimizing, whose constant folding would turn the weights back to float32
        model = fp16_weights(model)
    return model


def _tuned_to_eps(config: CompressConfig) -> bool:
    """Whether the strategy chose the ranks to fit eps (else the user or VBMF fixed them)."""
    fixed = (config.select == "vbmf" or config.rank is not None or config.ratio is not None
             or config.energy is not None)
    return not fixed


def _verify_heldout(prepared, problems, choice: Choice, metric, held, held_ref, config, back_off: bool,
                    confirm: Callable[[Choice], Choice] | None = None):
    """The chosen model's drop on the held-out part. If it exceeds eps and the ranks were chosen to
    fit eps, step back: a step moves the factored layer with the largest error to its next more
    accurate candidate, and the steps from the choice to keeping every layer form a path that is
    bisected for the first model that holds (the models a step-by-step walk tries, in about log2
    of their number of runs; the last, keeping every layer, is taken to hold). `confirm` checks each
    choice measured (--cost latency). Returns the model as written, its choice, its quality, how
    many steps back it is, and on how many samples it outputs NaN/Inf where the original does not."""
    meter = DropMeter(metric, held, held_ref, config.eps, config.batch_size)

    def holds(c: Choice) -> bool:  # no shape inference while searching: once, on the model kept
        return meter(_export(_build(prepared, problems, c, infer=False), config)) <= config.eps

    path = [dict(choice)]
    if confirm is not None:
        path[0] = confirm(path[0])
    steps = 0
    if back_off and not holds(path[0]):
        while any(c.factors is not None for c in path[-1].values()):
            path.append(_step_back(problems, path[-1]))
        failing, holding = 0, len(path) - 1
        while holding - failing > 1:
            mid = (failing + holding) // 2
            if confirm is not None:
                path[mid] = confirm(path[mid])
            if holds(path[mid]):
                holding = mid
            else:
                failing = mid
        steps = holding
    choice = path[steps]
    compressed = _export(_build(prepared, problems, choice), config)
    outputs = predict(compressed, held, config.batch_size)
    q = quality(metric, held_ref, outputs, held.labels)
    return compressed, choice, q, steps, _nonfinite_samples(held_ref, outputs, len(held))


def _nonfinite(outputs: list[np.ndarray], samples: int) -> np.ndarray:
    """Per sample: whether some floating-point output holds a NaN or Inf (outputs that are not one
    row per sample, like a Shape, say nothing about a sample)."""
    bad = np.zeros(samples, dtype=bool)
    for a in outputs:
        if a.ndim and len(a) == samples and np.issubdtype(a.dtype, np.floating):
            bad |= ~np.isfinite(a.reshape(samples, -1)).all(axis=1)
    return bad


def _nonfinite_samples(reference: list[np.ndarray], outputs: list[np.ndarray], samples: int) -> int:
    """Samples with a NaN or Inf in some output where the reference has none."""
    return int(np.sum(_nonfinite(outputs, samples) & ~_nonfinite(reference, samples)))


def _require_finite(model: onnx.ModelProto, search_ref: list[np.ndarray], held_ref: list[np.ndarray],
                    search: int, held: int) -> None:
    """The original's outputs must be finite: no quality drop can be measured against NaN."""
    bad = int(_nonfinite(search_ref, search).sum() + _nonfinite(held_ref, held).sum())
    if bad:
        broken = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES
                  and not np.all(np.isfinite(numpy_helper.to_array(t)))]
        cause = f" (weights with NaN/Inf: {', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''})" if broken else ""
        raise InvalidModel(f"the model itself outputs NaN or Inf on {bad} of {search + held} calibration "
                           f"samples{cause}; there is no quality to keep")


def _step_back(problems, choice: Choice) -> Choice:
    """The factored layer with the largest error to its next more accurate candidate."""
    choice = dict(choice)
    worst = max((p for p in problems if choice[p.name].factors is not None), key=lambda p: choice[p.name].error)
    current = choice[worst.name]
    better = [c for c in worst.candidates if c.error < current.error and c.method in (current.method, None)]
    choice[worst.name] = min(better, key=lambda c: c.cost) if better else worst.keep
    return choice


def _confirm_latency(timer: LayerTimer, problems, choice: Choice, reasons: dict[str, str]) -> Choice:
    """The chosen chains timed exactly (most were interpolated): one that runs no faster than its
    layer is not taken."""
    choice = dict(choice)
    for p in problems:
        c = choice[p.name]
        if c.factors is None:
            continue
        c.cost = timer.seconds(p.target, p.stats.in_shape, c.factors)
        if c.cost >= p.base_cost:
            reasons[p.name] = (f"kept: its {c.method} chain ran in {1e3 * c.cost:.3f} ms, the layer in "
                               f"{1e3 * p.base_cost:.3f} ms")
            choice[p.name] = p.keep
    return choice


def _layer_report(p, c, reason: str, timed: bool = False) -> LayerReport:
    layer = p.target.layer
    spatial = p.stats.in_spatial
    f = c.factors
    latency = (p.base_cost, c.cost) if timed else (None, None)
    failed = {method: why for method, why in p.declined.items() if why.startswith("numerical failure")}
    if f is None and failed:  # the methods that could not run say more than "nothing pays"
        reason = "kept: " + "; ".join(f"{method}: {why}" for method, why in failed.items())
    return LayerReport(p.name, p.target.op_type, c.method, list(c.ranks), int(layer.params),
                       int(layer.params if f is None else f.params), int(layer.macs(spatial)),
                       int(layer.macs(spatial) if f is None else f.macs(spatial)), float(c.error), reason,
                       *latency)
