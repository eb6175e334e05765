"""compress(): load, prepare, find targets, calibrate, build candidates, select ranks, rewrite,
verify, in order."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from ..calibration.capture import capture_within, statistics_bytes
from ..calibration.data import CalibrationError, CalibrationSet, input_layout, load_calibration, model_inputs
from ..compensation.refit import Compensation, References
from ..config import CompressConfig
from ..decompositions import reason_not_applicable
from ..errors import InvalidModel, OnnxLowrankError, OutOfMemory, OutputError, VerificationError
from ..graph import find_targets, load_model, prepare, save_model
from ..graph.index import WEIGHT_TYPES
from ..graph.outputs import output_layouts
from ..graph.targets import LayerTarget, Skipped, attention_projections
from ..metrics.base import Metric
from ..metrics.confidence import Bound
from ..metrics.quality import DropMeter, quality, resolution, resolve_metric
from ..quantization.int8 import Quantizer, quantized_units, unfused
from ..runtime.latency import LayerTimer, interleaved, time_session
from ..runtime.sessions import RUNTIME_ERRORS, costs_at, measuring_batch, predict, runtime_message, session
from ..selection import Choice, Search, SearchObserver
from ..selection.candidates import FactorCache, build_problems, price_latency
from ..selection.strategies import STRATEGIES
from .finetune_rounds import finetune_rounds
from .report import LayerReport, Report
from .verify import assemble, check_model, nonfinite_samples, require_finite, tuned_to_eps, verify_choice, written

Progress = Callable[[str, int | None], Callable[[], None]]  # stage name, steps (None: open-ended) -> advance()


def _quiet_progress(stage: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass
class _Run:
    """What the stages of one conversion share: the options (read, never changed), how progress
    is shown, who watches the search, and what the report takes from the run as it goes: the
    warnings given and each stage's time."""

    config: CompressConfig
    progress: Progress
    observer: SearchObserver
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        self.timings.setdefault(stage, 0.0)  # listed from its start: an error names the stage it stopped in
        yield
        self.timings[stage] += time.perf_counter() - start

    def warn(self, message: str) -> None:
        """`message` as a UserWarning at compress's caller (from a stage: warn, the stage,
        _compress, compress, the caller), and in the report."""
        warnings.warn(message, stacklevel=5)
        self.warnings.append(message)


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
    run = _Run(config, progress, observer or SearchObserver())
    try:
        return _compress(model, calibration, labels, groups, run)
    except MemoryError:
        stage = next(reversed(run.timings), "load")
        raise OutOfMemory(f"out of memory in the {stage} stage (--max-memory {config.max_memory / 2**30:.1f} GiB): "
                          "give --max-memory what the machine can spare, or fewer calibration samples") from None


def _compress(model, calibration, labels, groups, run: _Run) -> tuple[onnx.ModelProto, Report]:
    """The stages in order, each handing the next its typed result; the report from them all."""
    config = run.config
    with run.timed("load"):
        loaded = _load(model, run)
    with run.timed("calibrate"):
        cal = _calibrate(loaded, calibration, labels, groups, run)
    if not config.finetune_epochs:  # only a fine-tune's teacher needs it after the reference outputs
        loaded = replace(loaded, original=None)
    runtime = _runtime(loaded.prepared, cal, config)
    with run.timed("decompose"):
        problems = _decompose(loaded.targets, cal, runtime, run)
    search = _search(loaded.prepared, problems, cal, runtime, run)
    with run.timed("select"):
        choice, reasons = _select(loaded, search, cal, runtime, config)
    with run.timed("verify"):
        decided = _verify(loaded.prepared, problems, search, choice, reasons, cal, runtime, run)
    if config.finetune_epochs:
        with run.timed("finetune"):
            decided = _finetune(loaded, problems, search, decided, cal, runtime, run)
    quantized = _quantization(loaded.prepared, problems, decided, cal, runtime, run) if runtime.quantizer else None
    report = _report(loaded, cal, problems, search, search.drop(choice), decided, quantized, runtime, run)
    return decided.model, report


@dataclass(frozen=True)
class _Loaded:
    """The model as given (None once only a fine-tune would need it), the model prepared
    (BatchNorm and constants folded), the layers to factor and those skipped with their reasons."""

    original: onnx.ModelProto | None
    prepared: onnx.ModelProto
    targets: list[LayerTarget]
    skipped: list[Skipped]
    file_size: int               # of the model as given


@dataclass(frozen=True)
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
    metric: Metric
    level: float                 # the confidence the held-out bound is taken at (metrics.quality.resolution)
    resolution: str              # what the held-out part can resolve, as a line
    feed: dict[str, np.ndarray]  # one run of one sample (or of the model's fixed batch): costs are counted at it
    batch: int                   # samples per run asked for: --batch-size, or fewer to fit --max-memory
    compensation: Compensation | None  # refits every model built (compensation/refit.py); None: --no-compensate
    summary: dict                # the report's calibration entry
    statistics_bytes: int        # what the layer statistics take

    def macs(self, model: onnx.ModelProto, kind: str = "macs") -> float:
        """The model's MACs (or parameters) per sample."""
        costs = costs_at(model, self.feed)
        if kind == "params":
            return sum(c.params for c in costs)
        return sum(c.macs for c in costs) // self.data.batch_for(1)


@dataclass(frozen=True)
class _Runtime:
    """How candidate models run: `batch` samples at a time (the calibration's, or one per run for
    a dynamically quantized model), quantized as they will be written (`quantizer`, --quantize:
    ranges from the search part), each layer and chain timed (`timer`, --cost latency); `runs_as`,
    the original as it runs (quantized with --quantize), is timed whole; the ranks rounded to
    multiples of `multiple`, the widths the kernels run fast."""

    batch: int
    quantizer: Quantizer | None
    runs_as: onnx.ModelProto
    timer: LayerTimer | None
    multiple: int                # ranks are multiples of it (config.multiple) ...
    multiple_why: str            # ... for this reason


@dataclass(frozen=True)
class _Decided:
    """What the held-out part decided: the model written, its choice and each layer's reason, the
    units kept in float (--quantize; None: no quantized model held), the drop's bound there, the
    steps taken back and the models tested, the quality before and after on the held-out part,
    the whole models' latency (--cost latency), and the fine-tuning rounds (--finetune-epochs)."""

    model: onnx.ModelProto
    choice: Choice
    reasons: dict[str, str]
    floats: frozenset[str] | None
    bound: Bound
    backed_off: int
    tested: int
    quality_before: float
    quality_after: float
    latency: tuple[float, float] | None = None
    finetune: tuple[dict, ...] = ()


def _load(model, run: _Run) -> _Loaded:
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    try:  # what onnxruntime cannot run, we cannot calibrate or verify
        session(original)
    except RUNTIME_ERRORS as e:
        where = "" if isinstance(model, onnx.ModelProto) else f"{model}: "
        raise InvalidModel(f"{where}onnxruntime cannot load the model: {runtime_message(e)}") from None
    prepared = prepare(original)
    targets, skipped = find_targets(prepared)
    targets, skipped = _exclude(targets, skipped, run.config.exclude)
    targets, skipped = _factorable(targets, skipped, run.config.methods or auto_methods())
    if not targets:
        inside = _layers_in_subgraphs(prepared.graph)
        if inside and not skipped:
            message = (f"nothing to factor: the model's {inside} Conv/Gemm/MatMul layers are all inside If/Loop/Scan "
                       "subgraphs, which the converter does not rewrite (an export without control flow would do)")
        else:
            message = "nothing to factor: the model has no Conv, Gemm or MatMul layer" + (
                f" that can be ({len(skipped)} skipped; the report says why)" if skipped else "")
        run.warn(message)
    if run.config.finetune_epochs and targets:
        from ..bridge.convert import to_torch
        to_torch(prepared)  # a model onnx2torch cannot take fails now, not after the search
    return _Loaded(original, prepared, targets, skipped, original.ByteSize())


def _layers_in_subgraphs(graph: onnx.GraphProto) -> int:
    """Conv, Gemm and MatMul nodes inside the subgraphs of `graph`'s nodes, at any depth."""
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                count += sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in g.node) + _layers_in_subgraphs(g)
    return count


def _calibrate(loaded: _Loaded, calibration, labels, groups, run: _Run) -> _Calibrated:
    """The calibration set read and split; one run of the original over each part, capturing
    every target's input statistics on the search part; the metric the outputs call for, and the
    confidence the held-out part can bound eps at."""
    config, prepared, targets = run.config, loaded.prepared, loaded.targets
    data = load_calibration(calibration, prepared, labels, config.image, config.seed, groups)
    if data.synthetic:
        run.warn("no calibration data: ranks are chosen on synthetic N(0,1) inputs, which say little "
                 "about real ones; give --calib for a result you can trust")
    if (config.finetune_epochs or config.select == "hessian") and (data.whole or data.run_batch):
        # the PyTorch bridge batches the samples itself, along axis 0 of every array
        raise CalibrationError("--finetune-epochs and --select hessian need every input batched along axis 0 "
                               "with a free batch size; this model takes one sample or a fixed batch per run")
    search_set, held = data.split(config.holdout, config.seed)
    # what compensation fits to, read in the same pass: the original layers' outputs on the search part's two folds
    references = None
    if config.compensate and not data.synthetic and targets:
        references = References(targets, search_set, config.seed, config.max_memory // 8)
    advance = run.progress("capture", 1)
    try:  # each sample runs once: the search part in the pass, the held-out part through the model as given
        stats, search_ref, batch = capture_within(prepared, targets, search_set, config.batch_size,
                                                  config.max_memory, config.seed, references)
        held_ref = predict(loaded.original, held, batch)
    except RUNTIME_ERRORS as e:
        raise _runtime_failure("onnxruntime failed running the model on the calibration data", e) from None
    advance()
    summary = {"source": data.source, "samples": len(data), "search": len(search_set), "heldout": len(held),
               "synthetic": data.synthetic, "labels": data.labels is not None,
               "groups": None if data.groups is None else len(np.unique(data.groups)),
               "inputs": input_layout(prepared, data), "run_batch": search_set.batch_for(batch)}
    require_finite(prepared, search_ref, held_ref, len(search_set), len(held))
    metric = resolve_metric(config.metric, search_ref, data.labels, search_set.indices, output_layouts(prepared))
    line, level, coarse = resolution(metric, len(held), held.groups, config.eps, config.confidence, config.holdout)
    if coarse:
        run.warn(coarse)
    compensation = Compensation(references) if references is not None else None
    return _Calibrated(data, search_set, held, stats, search_ref, held_ref, metric, level, line, data.sample_feed(),
                       batch, compensation, summary, statistics_bytes(stats))


def _runtime(prepared: onnx.ModelProto, cal: _Calibrated, config: CompressConfig) -> _Runtime:
    # ranges from the search part: the held-out part stays unseen by every fit and every choice
    quantizer = Quantizer(prepared, cal.search_set, cal.batch, cal.feed) if config.quantize else None
    runs_as, batch = prepared, cal.batch
    if quantizer is not None:
        runs_as = quantizer(prepared)  # a model the quantizer refuses fails now, before the search
        # batched, a dynamically quantized model's drop depends on the batching: the search
        # (fragile samples first) and the check (in order) measured different drops of one model
        batch = measuring_batch(runs_as, batch)
    timer = LayerTimer(prepared, config.provider, config.threads, config.latency_batch, quantizer=quantizer) \
        if config.cost == "latency" else None
    return _Runtime(batch, quantizer, runs_as, timer, *config.multiple())


def _decompose(targets, cal: _Calibrated, runtime: _Runtime, run: _Run) -> list:
    """Each target's ladder of candidates, priced in MACs, parameters or measured time."""
    config, timer = run.config, runtime.timer
    problems = build_problems(targets, cal.stats, config.methods or auto_methods(),
                              "macs" if timer is not None else config.cost, config.data_aware,
                              runtime.multiple, config.jobs, run.progress("decompose", len(targets)),
                              FactorCache(config.max_memory // 32))
    if timer is not None:
        advance = run.progress("time", len(problems))
        for p in problems:
            price_latency(p, timer)
            advance()
    return problems


def _search(prepared, problems, cal: _Calibrated, runtime: _Runtime, run: _Run) -> Search:
    """What the strategies search with: candidate models built and measured on the search part
    (quantized as written, with --quantize: selection spends eps on both), and the cost of the
    rest of the model (skipped layers, activations, ...)."""
    config, quantizer = run.config, runtime.quantizer
    advance = run.progress("search", None)
    meter = DropMeter(cal.metric, cal.search_set, cal.search_ref, config.eps, runtime.batch)

    def measure(choice: Choice) -> float:
        # the export touches change a float model's outputs by rounding only: taken where it is quantized
        model_ = assemble(prepared, problems, choice, cal.compensation, measured=True,
                          config=config if quantizer is not None else None, quantizer=quantizer).model
        advance()
        drop = meter(model_)
        run.observer.measured(search, choice, model_, drop)
        return drop

    if runtime.timer is not None:
        sess = session(runtime.runs_as, "deploy", config.threads, config.provider)
        total = time_session(sess, cal.data.sample_feed(config.latency_batch)).median
    else:
        total = cal.macs(prepared, config.cost)
    # latencies measured apart do not add up exactly, so never below zero
    search = Search(problems, measure, config.eps, other_cost=max(total - sum(p.base_cost for p in problems), 0.0),
                    exact_original=quantizer is None, observer=run.observer,
                    written=lambda c: written(prepared, problems, c, config, cal.compensation, quantizer))
    return search


def _select(loaded: _Loaded, search: Search, cal: _Calibrated, runtime: _Runtime,
            config: CompressConfig) -> tuple[Choice, dict[str, str]]:
    """--select's strategy on the search part; with --cost latency, its choice confirmed by timing."""
    selected = STRATEGIES[config.select](search, config.strategy_context(loaded.prepared, cal.search_set,
                                                                         loaded.targets))
    choice, reasons = selected.choice, dict(selected.reasons)
    if runtime.timer is not None:
        choice = _confirm_latency(runtime.timer, search.problems, choice, reasons)
    return choice, reasons


def _verify(prepared, problems, search: Search, choice: Choice, reasons: dict[str, str], cal: _Calibrated,
            runtime: _Runtime, run: _Run) -> _Decided:
    """The chosen model decided on the held-out part: the upper confidence bound of its drop there
    within eps, else a step back (strategies tuned to eps: verify.verify_choice); a failure raises
    VerificationError unless --no-verify."""
    config, timer = run.config, runtime.timer
    # auto's own path back, unless --cost latency's confirmation changed the choice
    way_back = search.path if search.path and all(search.path[-1][k] is c for k, c in choice.items()) else None
    confirm = (lambda c: _confirm_latency(timer, problems, c, reasons)) if timer is not None else None
    data, reference = cal.held, cal.held_ref
    verified = verify_choice(prepared, problems, choice, cal.metric, data, reference, config,
                             back_off=config.verify and tuned_to_eps(config), level=cal.level, confirm=confirm,
                             quantizer=runtime.quantizer, feed=cal.feed, compensation=cal.compensation,
                             way_back=way_back, batch=runtime.batch)
    bound = verified.bound
    if timer is not None:
        timer.save()
    failures, notes = [], []  # failures fail verification; fixed ranks promised nothing
    nonfinite = nonfinite_samples(reference, verified.outputs, len(data))
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
        run.warn(message)
    reasons = {k: v + (" (backed off: the held-out bound exceeded eps)" if verified.choice[k] is not choice[k] else "")
               for k, v in reasons.items()}
    check_model(verified.model, prepared)
    latency = None
    if timer is not None:
        sessions = [session(m, "deploy", config.threads, config.provider) for m in (prepared, verified.model)]
        latency = tuple(float(np.median(t)) for t in interleaved(sessions, cal.data.sample_feed(config.latency_batch)))
    measure = cal.metric.against(reference, data.labels, data.indices)
    return _Decided(verified.model, verified.choice, reasons, verified.floats, bound, verified.steps, verified.tested,
                    measure.quality(reference).value, measure.quality(verified.outputs).value, latency)


def _finetune(loaded: _Loaded, problems, search: Search, decided: _Decided, cal: _Calibrated, runtime: _Runtime,
              run: _Run) -> _Decided:
    """--finetune-epochs: the rounds of finetune_rounds.py, trained on the search part; the
    cheapest model whose held-out bound is within eps is kept (`decided`: the selection's)."""
    config = run.config
    tuned = finetune_rounds(loaded.original, loaded.prepared, problems, decided.choice, decided.reasons, decided.model,
                            decided.bound, search, config, runtime.batch, cal.search_set, cal.search_ref, cal.held,
                            cal.held_ref, cal.metric, cal.level, cal.compensation)
    stopped = sum(r["stopped"] for r in tuned.rounds)
    if stopped:
        run.warn(f"fine-tuning stopped early in {stopped} of {len(tuned.rounds)} round(s): no learning rate from "
                 f"--finetune-lr {config.finetune_lr:g} down to a thousandth of it lowered the training loss (or the "
                 "model diverged)")
    check_model(tuned.model, loaded.prepared)
    if tuned.model is decided.model:
        return replace(decided, finetune=tuple(tuned.rounds))
    after = quality(cal.metric, cal.held_ref, predict(tuned.model, cal.held, runtime.batch), cal.held.labels,
                    cal.held.indices).value
    return replace(decided, model=tuned.model, choice=tuned.choice, reasons=tuned.reasons, bound=tuned.bound,
                   quality_after=after, finetune=tuple(tuned.rounds))


def _quantization(prepared, problems, decided: _Decided, cal: _Calibrated, runtime: _Runtime,
                  run: _Run) -> tuple[dict, set[str]]:
    """--quantize: which units are int8 and which float, and why (`float_layers`); the same choice
    in float beside it (its drop and size: what quantization cost and gave); quantized ops
    onnxruntime would still run in float. And the names of all the units."""
    config, quantizer, floats = run.config, runtime.quantizer, decided.floats
    built = assemble(prepared, problems, decided.choice, cal.compensation, config=config)
    float_model = built.model
    data, reference = cal.held, cal.held_ref
    float_drop = quality(cal.metric, reference, predict(float_model, data, runtime.batch), data.labels,
                         data.indices).drop
    found = built.units()
    if floats is None:
        why = {u.name: "kept in float: no quantized model held eps (the back-off ended unquantized)" for u in found}
        run.warn(f"--quantize int8: no quantized model kept the {cal.metric} drop within eps {config.eps}, "
                 "even with every Conv/Gemm/MatMul in float; the model is written unquantized")
    else:
        done = quantized_units(decided.model, found)
        why = {u.name: "kept in float by the back-off: that removed more error per MAC than a rank step"
               if u.name in floats else "left in float by onnxruntime's quantizer (no int8 kernel for it)"
               for u in found if u.name not in done}
        if not done:
            run.warn("--quantize int8: onnxruntime's quantizer quantized no layer of this model; "
                     "it is written in float")
    kept_float = [n for u in found if u.name in why for n in u.nodes]
    result = {"mode": quantizer.mode, "float_drop": float_drop, "float_file_size": float_model.ByteSize(),
              "int8_layers": len(found) - len(why), "float_layers": why,
              "unfused": [] if floats is None else unfused(decided.model, kept_float)}
    if result["unfused"]:
        run.warn(f"{len(result['unfused'])} quantized op(s) would run in float between DequantizeLinear and "
                 f"QuantizeLinear in onnxruntime (not fused): {', '.join(result['unfused'][:3])}")
    return result, {u.name for u in found}


def _report(loaded: _Loaded, cal: _Calibrated, problems, search: Search, search_drop: float, decided: _Decided,
            quantized: tuple[dict, set[str]] | None, runtime: _Runtime, run: _Run) -> Report:
    """The report, assembled once from what the stages gave."""
    config, prepared, compressed, bound = run.config, loaded.prepared, decided.model, decided.bound
    factored = {p.name for p in problems if decided.choice[p.name].factored}
    attention = attention_projections(prepared, factored)
    if attention:
        run.warn(f"{len(attention)} factored layer(s) are attention projections, which onnxruntime's transformer "
                 "optimizer cannot fuse into its Attention op once they are factored (MiniLM-L6 ran slower than the "
                 "original so); to keep the fusion, run onnxruntime.transformers.optimizer first and convert the model "
                 "it writes")
    memory = {"max_memory": config.max_memory, "statistics_bytes": cal.statistics_bytes, "peak_rss_bytes": peak_rss()}
    layers = [_layer_report(p, decided.choice[p.name], decided.reasons[p.name], runtime.timer is not None)
              for p in problems]
    skipped = [{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in loaded.skipped]
    quantization = {}
    if quantized is not None:
        quantization, unit_names = quantized
        in_float = quantization["float_layers"]
        for layer in layers:
            layer.precision = "float" if layer.name in in_float else "int8"
        for s in skipped:
            if s["name"] in unit_names:
                s["precision"] = "float" if s["name"] in in_float else "int8"
    latency = decided.latency or (None, None)
    return Report(
        config.eps, str(cal.metric), config.select, config.cost, config.data_aware, dict(cal.summary), layers=layers,
        skipped=skipped, params_before=model_params(prepared), params_after=model_params(compressed),
        macs_before=cal.macs(prepared), macs_after=cal.macs(compressed),
        file_size_before=loaded.file_size,
        file_size_after=compressed.ByteSize(), quality_before=decided.quality_before,
        quality_after=decided.quality_after, drop=bound.drop, bound=bound.upper, confidence=bound.level,
        bound_method=bound.method, groups=bound.groups, check_samples=bound.samples, resolution=cal.resolution,
        tested=decided.tested, rank_multiple=runtime.multiple, rank_multiple_why=runtime.multiple_why,
        search_drop=search_drop, backed_off=decided.backed_off, latency_before=latency[0],
        latency_after=latency[1], timings=dict(run.timings), trace=search.trace, warnings=list(run.warnings),
        finetune=list(decided.finetune), memory=memory, quantization=quantization)


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
    saved: list[Path] = []
    with _interrupts_ignored():
        try:  # all or nothing: a failure writing the report or the plots takes back the model
            save_model(out, dst)
            saved.append(Path(dst))
            report.file_size_after = Path(dst).stat().st_size
            report.file_size_before = Path(src).stat().st_size
            if report_path is not None:
                report.write_json(report_path)
                saved.append(Path(report_path))
            if plots is not None:  # last: on a failure it removes what it wrote itself
                report.plots(plots)
        except BaseException:
            for path in saved:
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
