"""compress(): load, prepare, find targets, calibrate, build candidates, select ranks, rewrite,
verify, in order."""

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

from ..calibration.capture import capture, memory_batch, statistics_bytes
from ..calibration.data import CalibrationError, CalibrationSet, input_layout, load_calibration, model_inputs
from ..compensation.refit import Compensation
from ..config import CompressConfig
from ..decompositions import reason_not_applicable
from ..errors import InvalidModel, OnnxLowrankError, OutOfMemory, OutputError, VerificationError
from ..graph import find_targets, load_model, prepare, save_model
from ..graph.index import WEIGHT_TYPES
from ..graph.outputs import output_layouts
from ..graph.targets import LayerTarget, Skipped, attention_projections
from ..metrics.confidence import Bound
from ..metrics.quality import DropMeter, quality, resolution, resolve_metric
from ..metrics.user import UserMetric
from ..quantization.int8 import Quantizer, quantized_units, unfused, units
from ..runtime.latency import LayerTimer, interleaved, time_session
from ..runtime.sessions import RUNTIME_ERRORS, costs_at, measuring_batch, predict, runtime_message, session
from ..selection import Choice, Search, SearchObserver
from ..selection.candidates import FactorCache, build_problems, price_latency
from ..selection.strategies import STRATEGIES
from .finetune_rounds import finetune_rounds
from .report import LayerReport, Report
from .verify import (build, check_model, each, export, nonfinite_samples, require_finite, tuned_to_eps, verify_choice,
                     written)

Progress = Callable[[str, int | None], Callable[[], None]]  # stage name, steps (None: open-ended) -> advance()


def _quiet_progress(stage: str, total: int) -> Callable[[], None]:
    return lambda: None


@contextmanager
def _timed(report: Report, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    report.timings.setdefault(stage, 0.0)  # listed from its start: an error names the stage it stopped in
    yield
    report.timings[stage] += time.perf_counter() - start


def _warn(report: Report, message: str) -> None:
    """`message` as a UserWarning at compress's caller (from a stage: _warn, the stage, _compress,
    compress, the caller), and in the report."""
    warnings.warn(message, stacklevel=5)
    report.warnings.append(message)


def compress(model: onnx.ModelProto | str | os.PathLike, config: CompressConfig | None = None,
             calibration: Any = None, labels: Any = None,
             progress: Progress = _quiet_progress, metric: Callable | str | None = None, groups: Any = None,
             observer: SearchObserver | None = None) -> tuple[onnx.ModelProto, Report]:
    """Compress `model` within `config.eps`. `calibration`: an .npz/.npy path, a folder of
    images, an object with get_next() (onnxruntime's CalibrationDataReader), or None for
    synthetic inputs (with a warning). `labels`: an .npy path, an npz key, or an array.
    `metric`: what eps bounds, in place of config.metric: your own function
    `fn(reference, outputs[, indices]) -> drop` (metrics.user.UserMetric) or a metric's name.
    `groups`: each sample's source (photo, file, speaker, document) as an .npy path, an npz key
    or an array: every split keeps a group on one side (without, samples are taken as independent).
    `observer`: a selection.SearchObserver that watches the search (for studies of it)."""
    config = config or CompressConfig()
    if metric is not None:
        config = replace(config, metric=metric)
    config.validate()
    report = Report(config.eps, str(config.metric), config.select, config.cost, config.data_aware, {})
    try:
        return _compress(model, config, calibration, labels, groups, progress, report, observer or SearchObserver())
    except MemoryError:
        stage = next(reversed(report.timings), "load")
        raise OutOfMemory(f"out of memory in the {stage} stage (--max-memory {config.max_memory / 2**30:.1f} GiB): "
                          "give --max-memory what the machine can spare, or fewer calibration samples") from None


def _compress(model, config: CompressConfig, calibration, labels, groups, progress: Progress,
              report: Report, observer: SearchObserver) -> tuple[onnx.ModelProto, Report]:
    with _timed(report, "load"):
        original, prepared, targets = _load(model, config, report)
        if config.finetune_epochs and targets:
            from ..bridge.convert import to_torch
            to_torch(prepared)  # a model onnx2torch cannot take fails now, not after the search
    with _timed(report, "calibrate"):
        cal = _calibrate(original, prepared, targets, calibration, labels, groups, config, report, progress)
    config = replace(config, batch_size=cal.batch)
    if not config.finetune_epochs:  # only a fine-tune's teacher needs it after the reference outputs
        original = None
    # ranges from the search part: the held-out part stays unseen by every fit and every choice
    quantizer = Quantizer(prepared, cal.search_set, cal.batch, cal.feed) if config.quantize else None
    runs_as = prepared  # the whole model as it runs
    if quantizer is not None:
        runs_as = quantizer(prepared)  # a model the quantizer refuses fails now, before the search
        # batched, a dynamically quantized model's drop depends on the batching: the search
        # (fragile samples first) and the check (in order) measured different drops of one model
        config = replace(config, batch_size=measuring_batch(runs_as, config.batch_size))
    timer = LayerTimer(prepared, config.provider, config.threads, config.latency_batch, quantizer=quantizer) \
        if config.cost == "latency" else None
    with _timed(report, "decompose"):
        problems = _decompose(targets, cal, config, timer, progress)
    search = _search(prepared, runs_as, problems, cal, config, timer, quantizer, progress, observer)
    with _timed(report, "select"):
        selected = STRATEGIES[config.select](search, config.strategy_context(prepared, cal.search_set, targets))
        choice, reasons = selected.choice, selected.reasons
        if timer is not None:
            choice = _confirm_latency(timer, problems, choice, reasons)
        report.search_drop = search.drop(choice)
    with _timed(report, "verify"):
        # auto's own path back, unless --cost latency's confirmation changed the choice
        way_back = search.path if search.path and all(search.path[-1][k] is c for k, c in choice.items()) else None
        compressed, choice, floats, bound = _verify(prepared, problems, choice, reasons, cal, config, timer,
                                                    quantizer, report, way_back)
    if config.finetune_epochs:
        with _timed(report, "finetune"):
            compressed, choice, reasons = _finetune(original, prepared, problems, choice, reasons, compressed,
                                                    bound, search, cal, config, report)
    _summarize(report, prepared, compressed, problems, choice, reasons, search, cal, timer is not None)
    if quantizer is not None:
        _quantization_report(report, prepared, compressed, problems, choice, floats, cal, config, quantizer)
    return compressed, report


@dataclass
class _Calibrated:
    """What the calibration stage gives the stages after it. The set is split (whole groups to a
    side): the search part is what everything is fitted and chosen on (layer statistics,
    compensation, quantization ranges, the search, fine-tuning); the held-out part decides what is
    written, and nothing else reads it."""

    data: CalibrationSet
    search_set: CalibrationSet
    held: CalibrationSet
    stats: dict                  # per target: its input statistics
    search_ref: list[np.ndarray]  # the original's outputs on each part
    held_ref: list[np.ndarray]
    metric: str | UserMetric
    level: float                 # the confidence the held-out bound is taken at (metrics.quality.resolution)
    feed: dict[str, np.ndarray]  # one run of one sample (or of the model's fixed batch): costs are counted at it
    batch: int                   # samples per run asked for: --batch-size, or fewer to fit --max-memory
    compensation: Compensation | None  # refits every model built (compensation/refit.py); None: --no-compensate

    def macs(self, model: onnx.ModelProto, kind: str = "macs") -> float:
        """The model's MACs (or parameters) per sample."""
        costs = costs_at(model, self.feed)
        if kind == "params":
            return sum(c.params for c in costs)
        return sum(c.macs for c in costs) // self.data.batch_for(1)


def _load(model, config: CompressConfig, report: Report) -> tuple[onnx.ModelProto, onnx.ModelProto, list[LayerTarget]]:
    """The model as given, the model prepared (BatchNorm and constants folded), and the layers
    to factor (the others are in the report with their reasons)."""
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    report.file_size_before = original.ByteSize()
    try:  # what onnxruntime cannot run, we cannot calibrate or verify
        session(original)
    except RUNTIME_ERRORS as e:
        where = "" if isinstance(model, onnx.ModelProto) else f"{model}: "
        raise InvalidModel(f"{where}onnxruntime cannot load the model: {runtime_message(e)}") from None
    prepared = prepare(original)
    targets, skipped = find_targets(prepared)
    targets, skipped = _exclude(targets, skipped, config.exclude)
    targets, skipped = _factorable(targets, skipped, config.methods or auto_methods())
    report.skipped = [{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in skipped]
    if not targets:
        inside = _layers_in_subgraphs(prepared.graph)
        if inside and not skipped:
            message = (f"nothing to factor: the model's {inside} Conv/Gemm/MatMul layers are all inside If/Loop/Scan "
                       "subgraphs, which the converter does not rewrite (an export without control flow would do)")
        else:
            message = "nothing to factor: the model has no Conv, Gemm or MatMul layer" + (
                f" that can be ({len(skipped)} skipped; the report says why)" if skipped else "")
        _warn(report, message)
    return original, prepared, targets


def _layers_in_subgraphs(graph: onnx.GraphProto) -> int:
    """Conv, Gemm and MatMul nodes inside the subgraphs of `graph`'s nodes, at any depth."""
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                count += sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in g.node) + _layers_in_subgraphs(g)
    return count


def _calibrate(original, prepared, targets, calibration, labels, groups, config: CompressConfig, report: Report,
               progress: Progress) -> _Calibrated:
    """The calibration set read and split; one run of the original over each part, capturing
    every target's input statistics on the search part; the metric the outputs call for, and the
    confidence the held-out part can bound eps at."""
    data = load_calibration(calibration, prepared, labels, config.image, config.seed, groups)
    if data.synthetic:
        message = ("no calibration data: ranks are chosen on synthetic N(0,1) inputs, which say little "
                   "about real ones; give --calib for a result you can trust")
        _warn(report, message)
    if (config.finetune_epochs or config.select == "hessian") and (data.whole or data.run_batch):
        # the PyTorch bridge batches the samples itself, along axis 0 of every array
        raise CalibrationError("--finetune-epochs and --select hessian need every input batched along axis 0 "
                               "with a free batch size; this model takes one sample or a fixed batch per run")
    search_set, held = data.split(config.holdout, config.seed)
    advance = progress("capture", 1)
    try:
        # a run's tensors are sized to an eighth of --max-memory, the statistics to a third
        batch = memory_batch(prepared, targets, search_set, config.batch_size, config.max_memory // 8)
        stats, search_ref = capture(prepared, targets, search_set, batch, seed=config.seed,
                                    stats_budget=config.max_memory // 3)
        held_ref = predict(original, held, batch)
    except RUNTIME_ERRORS as e:
        raise _runtime_failure("onnxruntime failed running the model on the calibration data", e) from None
    advance()
    report.calibration = {"source": data.source, "samples": len(data), "search": len(search_set),
                          "heldout": len(held), "synthetic": data.synthetic, "labels": data.labels is not None,
                          "groups": None if data.groups is None else len(np.unique(data.groups)),
                          "inputs": input_layout(prepared, data), "run_batch": search_set.batch_for(batch)}
    report.memory = {"max_memory": config.max_memory, "statistics_bytes": statistics_bytes(stats)}
    require_finite(prepared, search_ref, held_ref, len(search_set), len(held))
    metric = resolve_metric(config.metric, search_ref, data.labels, search_set.indices, output_layouts(prepared))
    report.metric = str(metric)
    report.resolution, level, coarse = resolution(metric, len(held), held.groups, config.eps, config.confidence,
                                                  config.holdout)
    if coarse:
        _warn(report, coarse)
    compensation = None
    if config.compensate and not data.synthetic and targets:
        # on the search part, in two folds: the search measures each refit on the fold it did not see
        compensation = Compensation(prepared, targets, search_set, batch, config.seed, config.max_memory // 8)
    return _Calibrated(data, search_set, held, stats, search_ref, held_ref, metric, level, data.sample_feed(), batch,
                       compensation)


def _decompose(targets, cal: _Calibrated, config: CompressConfig, timer: LayerTimer | None,
               progress: Progress) -> list:
    """Each target's ladder of candidates, priced in MACs, parameters or measured time."""
    problems = build_problems(targets, cal.stats, config.methods or auto_methods(),
                              "macs" if timer is not None else config.cost, config.data_aware,
                              config.multiple(), config.jobs, progress("decompose", len(targets)),
                              FactorCache(config.max_memory // 32))
    if timer is not None:
        advance = progress("time", len(problems))
        for p in problems:
            price_latency(p, timer)
            advance()
    return problems


def _search(prepared, runs_as: onnx.ModelProto, problems, cal: _Calibrated, config: CompressConfig,
            timer: LayerTimer | None, quantizer: Quantizer | None, progress: Progress,
            observer: SearchObserver) -> Search:
    """What the strategies search with: candidate models built and measured on the search part
    (quantized as written, with --quantize: selection spends eps on both), and the cost of the
    rest of the model (skipped layers, activations, ...). `runs_as`: the original as it runs
    (quantized with --quantize), timed whole under --cost latency."""
    advance = progress("search", None)
    meter = DropMeter(cal.metric, cal.search_set, cal.search_ref, config.eps, config.batch_size)

    def measure(choice: Choice) -> float:
        model_ = build(prepared, problems, choice, False, cal.compensation, measured=True)
        if quantizer is not None:
            model_ = each(model_, lambda m: quantizer(export(m, config)))
        advance()
        drop = meter(model_)
        observer.measured(search, choice, model_, drop)
        return drop


    if timer is not None:
        sess = session(runs_as, "deploy", config.threads, config.provider)
        total = time_session(sess, cal.data.sample_feed(config.latency_batch)).median
    else:
        total = cal.macs(prepared, config.cost)
    # latencies measured apart do not add up exactly, so never below zero
    search = Search(problems, measure, config.eps, other_cost=max(total - sum(p.base_cost for p in problems), 0.0),
                    exact_original=quantizer is None, observer=observer,
                    written=lambda c: written(prepared, problems, c, config, cal.compensation, quantizer))
    return search


def _verify(prepared, problems, choice: Choice, reasons: dict[str, str], cal: _Calibrated, config: CompressConfig,
            timer: LayerTimer | None, quantizer: Quantizer | None, report: Report,
            way_back: list[Choice] | None = None) -> tuple[onnx.ModelProto, Choice, frozenset[str] | None, Bound]:
    """The chosen model decided on the held-out part: the upper confidence bound of its drop there
    within eps, else a step back (strategies tuned to eps: verify.verify_choice); a failure raises
    VerificationError unless --no-verify."""
    before_backoff = choice
    confirm = (lambda c: _confirm_latency(timer, problems, c, reasons)) if timer is not None else None
    data, reference = cal.held, cal.held_ref
    verified = verify_choice(prepared, problems, choice, cal.metric, data, reference, config,
                             back_off=config.verify and tuned_to_eps(config), level=cal.level, confirm=confirm,
                             quantizer=quantizer, feed=cal.feed, compensation=cal.compensation,
                             way_back=way_back)
    compressed, choice, outputs, bound = verified.model, verified.choice, verified.outputs, verified.bound
    if timer is not None:
        timer.save()
    _bound_report(report, bound)
    report.backed_off, report.tested = verified.steps, verified.tested
    failures, notes = [], []  # failures fail verification; fixed ranks promised nothing
    nonfinite = nonfinite_samples(reference, outputs, len(data))
    if nonfinite:
        failures.append(f"the compressed model outputs NaN or Inf on {nonfinite} of {len(data)} held-out "
                        "samples where the original does not")
    if bound.upper > config.eps:
        exceeds = (f"the {cal.metric} drop's bound {bound.upper:.4f} at confidence {bound.level:g} exceeds eps "
                   f"{config.eps} (measured drop {bound.drop:.4f} on {bound.samples} held-out samples)")
        if not tuned_to_eps(config):
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
            reasons[p.name] += " (backed off: the held-out bound exceeded eps)"
    report.quality_before = quality(cal.metric, reference, reference, data.labels, data.indices).value
    report.quality_after = quality(cal.metric, reference, outputs, data.labels, data.indices).value
    check_model(compressed, prepared)
    if timer is not None:
        sessions = [session(m, "deploy", config.threads, config.provider) for m in (prepared, compressed)]
        report.latency_before, report.latency_after = (
            float(np.median(t)) for t in interleaved(sessions, cal.data.sample_feed(config.latency_batch)))
    return compressed, choice, verified.floats, bound


def _bound_report(report: Report, bound: Bound) -> None:
    """The held-out part's verdict on the written model, into the report."""
    report.drop, report.bound, report.confidence = bound.drop, bound.upper, bound.level
    report.bound_method, report.groups, report.check_samples = bound.method, bound.groups, bound.samples


def _finetune(original, prepared, problems, choice: Choice, reasons, compressed, verified: Bound, search: Search,
              cal: _Calibrated, config: CompressConfig, report: Report
              ) -> tuple[onnx.ModelProto, Choice, dict[str, str]]:
    """--finetune-epochs: the rounds of finetune_rounds.py, trained on the search part; the
    cheapest model whose held-out bound is within eps is kept (`verified`: the selection's)."""
    selected = compressed
    compressed, choice, bound, reasons = finetune_rounds(
        original, prepared, problems, choice, reasons, compressed, verified, search, config,
        cal.search_set, cal.search_ref, cal.held, cal.held_ref, cal.metric, cal.level, report)
    stopped = sum(r["stopped"] for r in report.finetune)
    if stopped:
        message = (f"fine-tuning stopped early in {stopped} of {len(report.finetune)} round(s): no learning "
                   f"rate from --finetune-lr {config.finetune_lr:g} down to a thousandth of it lowered the "
                   "training loss (or the model diverged)")
        _warn(report, message)
    if compressed is not selected:
        _bound_report(report, bound)
        report.quality_after = quality(cal.metric, cal.held_ref, predict(compressed, cal.held, config.batch_size),
                                       cal.held.labels, cal.held.indices).value
    check_model(compressed, prepared)
    return compressed, choice, reasons


def _summarize(report: Report, prepared, compressed, problems, choice: Choice, reasons: dict[str, str],
               search: Search, cal: _Calibrated, timed: bool) -> None:
    """Per-layer and whole-model numbers of the result into the report."""
    report.trace = search.trace
    report.layers = [_layer_report(p, choice[p.name], reasons[p.name], timed) for p in problems]
    report.macs_before, report.macs_after = cal.macs(prepared), cal.macs(compressed)
    report.params_before, report.params_after = model_params(prepared), model_params(compressed)
    report.file_size_after = compressed.ByteSize()
    report.memory["peak_rss_bytes"] = peak_rss()
    factored = {p.name for p in problems if choice[p.name].factored}
    attention = attention_projections(prepared, factored)
    if attention:
        _warn(report, f"{len(attention)} factored layer(s) are attention projections, which onnxruntime's "
                      "transformer optimizer cannot fuse into its Attention op once they are factored (MiniLM-L6 "
                      "ran slower than the original so); to keep the fusion, run onnxruntime.transformers.optimizer "
                      "first and convert the model it writes")


def _quantization_report(report: Report, prepared, compressed, problems, choice: Choice,
                         floats: frozenset[str] | None, cal: _Calibrated, config: CompressConfig,
                         quantizer: Quantizer) -> None:
    """--quantize: which layers are int8 and which float, and why; the same choice in float beside
    it (its drop and size: what quantization cost and gave); quantized ops onnxruntime would still
    run in float."""
    float_model = written(prepared, problems, choice, config, cal.compensation)
    data, reference = cal.held, cal.held_ref
    float_drop = quality(cal.metric, reference, predict(float_model, data, config.batch_size), data.labels,
                         data.indices).drop
    found = units(float_model, [p.target for p in problems])
    if floats is None:
        why = {u.name: "kept in float: no quantized model held eps (the back-off ended unquantized)" for u in found}
        _warn(report, f"--quantize int8: no quantized model kept the {cal.metric} drop within eps {config.eps}, "
                      "even with every Conv/Gemm/MatMul in float; the model is written unquantized")
    else:
        done = quantized_units(compressed, found)
        why = {u.name: "kept in float by the back-off: that removed more error per MAC than a rank step"
               if u.name in floats else "left in float by onnxruntime's quantizer (no int8 kernel for it)"
               for u in found if u.name not in done}
        if not done:
            _warn(report, "--quantize int8: onnxruntime's quantizer quantized no layer of this model; "
                          "it is written in float")
    report.quantization = {"mode": quantizer.mode, "float_drop": float_drop,
                           "float_file_size": float_model.ByteSize(), "int8_layers": len(found) - len(why),
                           "float_layers": why,
                           "unfused": [] if floats is None else unfused(compressed, [n for u in found if u.name in why
                                                                                    for n in u.nodes])}
    for layer in report.layers:
        layer.precision = "float" if layer.name in why else "int8"
    for s in report.skipped:
        if any(u.name == s["name"] for u in found):
            s["precision"] = "float" if s["name"] in why else "int8"
    if report.quantization["unfused"]:
        _warn(report, f"{len(report.quantization['unfused'])} quantized op(s) would run in float between "
                      f"DequantizeLinear and QuantizeLinear in onnxruntime (not fused): "
                      f"{', '.join(report.quantization['unfused'][:3])}")


def peak_rss() -> int:
    """This process's largest resident set so far, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _runtime_failure(what: str, error: Exception) -> OnnxLowrankError:
    """onnxruntime's error as ours: out of memory where it could not allocate, else `what`."""
    message = runtime_message(error)
    if "alloc" in message.lower():
        return OutOfMemory(f"onnxruntime could not allocate memory ({message}); give --max-memory what the "
                           "machine can spare, or a smaller --batch-size")
    return CalibrationError(f"{what}: {message}")


def compress_file(src: str | os.PathLike, dst: str | os.PathLike, config: CompressConfig | None = None,
                  calibration: Any = None, labels: Any = None, report_path: str | os.PathLike | None = None,
                  progress: Progress = _quiet_progress, plots: str | os.PathLike | None = None,
                  groups: Any = None) -> Report:
    """Path to path. `src` and the calibration files are never modified: an output naming one of
    them is refused before any work. The model, the report and the plots are written all or
    nothing, each file atomically, by rank 0 of a torchrun job only."""
    from ..bridge.finetune import process_rank

    _check_paths(src, dst, calibration, labels, report_path, groups=groups)
    out, report = compress(src, config, calibration, labels, progress, groups=groups)
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


def _check_paths(src, dst, calibration, labels, report_path, teacher=None, groups=None) -> None:
    """Before any work: no output may name an input (the model, its external data, the calibration
    data, the labels, a fine-tune's teacher), directly or through a symbolic link, nor the other
    output; each output's folder must exist. (A hard link to an input is safe: outputs are renamed into place, which
    replaces the link, not the bytes it shares.)"""
    inputs = [("the input model", src)] + [("the input model's external data", p) for p in _external_data(src)]
    if isinstance(calibration, (str, os.PathLike)):
        inputs.append(("the calibration data", calibration))
    for what, side in (("the labels", labels), ("the groups", groups)):
        if isinstance(side, (str, os.PathLike)) and Path(side).is_file():  # else an npz key
            inputs.append((what, side))
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
    from ..bridge.finetune import FinetuneOptions, finetune, process_rank

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
    metric = resolve_metric(metric, held_ref, data.labels, held.indices, output_layouts(teacher_model))
    before = quality(metric, held_ref, predict(student_model, held), held.labels, held.indices)
    tuned, log = finetune(student_model, teacher_model, train, options)
    after = quality(metric, held_ref, predict(tuned, held), held.labels, held.indices)
    if process_rank() == 0:
        with _interrupts_ignored():
            save_model(tuned, dst)
    return FinetuneResult(str(metric), before.value, after.value,
                          quality(metric, held_ref, held_ref, held.labels, held.indices).value,
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
    from ..selection.candidates import AUTO_METHODS

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


def _confirm_latency(timer: LayerTimer, problems, choice: Choice, reasons: dict[str, str]) -> Choice:
    """The chosen chains timed exactly (most were interpolated): one that runs no faster than its
    layer is not taken."""
    choice = dict(choice)
    for p in problems:
        c = choice[p.name]
        if not c.factored:
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
