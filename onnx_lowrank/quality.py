"""Model quality, measured end to end in onnxruntime: what `--eps` bounds.

- accuracy  (labels given): the drop in top-1 accuracy, 0.005 = half a point (001's EPS);
- agreement (no labels, one (samples, classes) output): the fraction of samples whose top-1 changes
  (rows of unit length with negative entries are embeddings, not classes: r2; two classes are a
  score its users threshold, and a top-1 that is one class on every sample has no change to
  count: r2 too, counts_see_it);
- r2        (other outputs, the default): 1 - R^2 per output channel, averaged over the channels,
  the worst output counting. Each channel (the axis the layer that wrote it writes channels on,
  graph/outputs.py: 1 for a Conv, the last for a MatMul; axis 1 where the graph does not say; each
  element of a (samples, features) output) counts on its own scale, its error against how much the
  original's channel varies across the samples about its per-position mean: a part of the output
  that does not depend on the input (an anchor grid, an offset, padding) adds nothing to the scale
  that errors elsewhere are hidden in. Among the channels one layer wrote, a near-silent one counts
  against at least a share of their typical variance (LAYER_FLOOR), not against its own near-zero;
- cosine    (an option): 1 - mean cosine similarity per sample, the worst output counting. It can
  be fooled: a detector's class scores zeroed beside pixel boxes on a constant grid kept 0.99.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from .calibration.data import CalibrationSet, token_mask, without_padding
from .confidence import (BOOTSTRAP, MIN_GROUPS, MIN_LEVEL, USER_BOOTSTRAP, Bound, bootstrap_bound, counts_bound,
                         effective_samples, level_in_force, no_change_bound, samples_for, studentized_bound)
from .errors import MetricError, first_line
from .graph.io import weights_apart
from .graph.outputs import Layout

METRICS = ("auto", "accuracy", "agreement", "r2", "cosine")


# what onnxruntime raises on a model it cannot load or run (plain Exceptions, not RuntimeError)
RUNTIME_ERRORS = tuple(getattr(_state, name) for name in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel", "NotImplemented",
    "RuntimeException", "EPFail", "EngineError", "NotFound", "ModelRequiresCompilation", "DeviceReset",
    "ModelLoaded", "ModelLoadCanceled") if hasattr(_state, name))


def runtime_message(error: Exception) -> str:
    """The first line of onnxruntime's message, without its "[ONNXRuntimeError] : 1 : FAIL : "."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(error))


def session(model: onnx.ModelProto | bytes, threads: int = 0,
            weights: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """`weights`: the values of initializers `model` holds as in-memory stubs (graph.io.weights_apart),
    for models built from one made weightless once (the sensitivity probes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: a failed run reaches the user once, as our error line
    # idle threads sleep instead of spinning: on a machine shared with other work (or with our own
    # numpy between runs) spinning threads steal the cores the work needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no arena: it keeps the largest batch's buffers for the session's life, and the converter
    # holds several sessions (measured on VGG-16 at 224^2: the arena's growth was GBs of the peak)
    options.enable_cpu_mem_arena = False
    if isinstance(model, bytes):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    light, names, arrays = weights_apart(model)
    if weights:
        held = [t.name for t in light.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL and t.name in weights]
        names, arrays = names + held, arrays + [weights[n] for n in held]
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(w) for w in arrays])
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess.weights = arrays  # onnxruntime reads them where they are: they must live as long as the session
    return sess


class FoldedModel:
    """Models that each answer for part of the calibration set: sample i (by its index in the
    whole set) is run by models[fold[i]]. A model refit on the calibration data is measured so
    on samples it was not fitted on (compensate.py: two refits, each on the other's fold)."""

    def __init__(self, models: list[onnx.ModelProto], fold: np.ndarray):
        self.models, self.fold = models, fold
        self._sessions: list[ort.InferenceSession] | None = None

    def map(self, f: Callable[[onnx.ModelProto], onnx.ModelProto]) -> "FoldedModel":
        """Each model passed through `f` (export touches, quantization)."""
        return FoldedModel([f(m) for m in self.models], self.fold)

    def get_outputs(self):
        return self.sessions()[0].get_outputs()

    def sessions(self) -> list[ort.InferenceSession]:
        if self._sessions is None:
            self._sessions = [session(m) for m in self.models]
        return self._sessions

    def predict(self, data: CalibrationSet, batch_size: int, names: list[str]) -> list[np.ndarray]:
        fold = self.fold[data.indices]
        parts = [(np.flatnonzero(fold == k), sess) for k, sess in enumerate(self.sessions())]
        parts = [(idx, predict(sess, data.take(idx), batch_size, names)) for idx, sess in parts if len(idx)]
        joined = []
        for j in range(len(names)):
            first = parts[0][1][j]
            out = np.empty((len(data),) + first.shape[1:], first.dtype)
            for idx, outs in parts:
                out[idx] = outs[j]
            joined.append(out)
        return joined


def predict(model: onnx.ModelProto | ort.InferenceSession | FoldedModel, data: CalibrationSet, batch_size: int = 64,
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """The named outputs (default: the graph's) over the whole set, in the batches the model takes;
    a transformer's token outputs zero at padding (calibration.data.without_padding)."""
    if isinstance(model, FoldedModel):
        return model.predict(data, batch_size, outputs or [o.name for o in model.get_outputs()])
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    runs: list[list[tuple[np.ndarray, int]]] = [[] for _ in names]
    for feed, count in data.batches(batch_size):
        mask = token_mask(feed)
        for store, value in zip(runs, sess.run(names, feed)):
            store.append((without_padding(value, mask), count))
    return [data.join(r) for r in runs]


def measuring_batch(model: onnx.ModelProto, batch_size: int) -> int:
    """The batch a model's quality is measured in: one sample per run for a dynamically quantized
    one. DynamicQuantizeLinear takes its range over the whole run, so a sample's outputs depend on
    the samples batched with it; one per run, they are the sample's own (a batch-1 deployment's)."""
    return 1 if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) else batch_size


def is_classifier(outputs: list[np.ndarray]) -> bool:
    """One (samples, classes) output that is not an embedding. Rows of unit length are embeddings
    (a sentence embedder's L2-normalised pooling): their argmax is no class, so r2 measures them.
    Probabilities of a confident classifier have rows of nearly unit length too, but no negatives."""
    if not (len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1):
        return False
    out = outputs[0].astype(np.float64)
    return not (np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3) and (out < 0).any())


@dataclass(frozen=True)
class R2:
    """The r2 metric with each graph output's Layout (None: axis 1, each channel alone). The name
    "r2" given in place of it is the metric without layouts."""
    layouts: tuple[Layout | None, ...] = ()

    def __str__(self) -> str:
        return "r2"

    def __format__(self, spec: str) -> str:
        return format("r2", spec)


def _layouts(metric, outputs: int) -> list[Layout | None] | None:
    """Per output, its layout under r2; None when `metric` is not r2."""
    if isinstance(metric, R2):
        return list(metric.layouts) if len(metric.layouts) == outputs else [None] * outputs
    return [None] * outputs if metric == "r2" else None


class UserMetric:
    """The user's own metric, as NNCF's validation_fn and AIMET's eval callback are: a function
    of the original's outputs and the candidate's on the same samples (lists of arrays, one per
    graph output, samples along axis 0) that returns the drop, which --eps bounds:
    `fn(reference, outputs)`, or `fn(reference, outputs, indices)` to be told which calibration
    samples they are (positions in the set given, e.g. to look up ground truth for a task metric
    such as mAP). It is called on every sample each time: there is no early stop for it."""

    def __init__(self, fn: Callable, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        try:
            params = inspect.signature(fn).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self.takes_indices = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):  # a builtin without a signature: the two-argument form
            self.takes_indices = False

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:  # f-strings name it
        return format(self.name, spec)

    def __call__(self, reference: list[np.ndarray], outputs: list[np.ndarray],
                 indices: np.ndarray | None = None) -> float:
        """`indices`: which calibration samples these are (None: the first ones, in order)."""
        if indices is None:
            indices = np.arange(len(reference[0]))
        try:
            value = self.fn(reference, outputs, indices) if self.takes_indices else self.fn(reference, outputs)
        except Exception as e:  # the user's code: any failure is theirs to see, in one line
            raise MetricError(f"--metric {self.name} raised {type(e).__name__}: {first_line(e)}") from None
        try:
            drop = float(value)
        except (TypeError, ValueError):
            raise MetricError(f"--metric {self.name} returned {value!r:.60}, not a number (the drop)") from None
        if not np.isfinite(drop):
            raise MetricError(f"--metric {self.name} returned {drop}: the drop must be a finite number")
        return drop


def load_metric(spec: str) -> UserMetric:
    """`module:function` (imported; the working directory is searched first) or `path.py:function`."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise MetricError(f"--metric {spec!r}: give a name ({', '.join(METRICS)}), module:function or "
                          "path.py:function")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise MetricError(f"--metric {spec}: {path}: no such file")
            module_spec = importlib.util.spec_from_file_location(f"_onnx_lowrank_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(os.getcwd())
        fn = getattr(module, attr)
    except MetricError:
        raise
    except Exception as e:  # an import error, or the module's own code failing as it loads
        raise MetricError(f"--metric {spec}: cannot load it: {type(e).__name__}: {first_line(e)}") from None
    if not callable(fn):
        raise MetricError(f"--metric {spec}: {attr} is not a function")
    return UserMetric(fn, spec)


def resolve_metric(metric: str | Callable, reference: list[np.ndarray], labels: np.ndarray | None,
                   indices: np.ndarray | None = None, layouts: list[Layout | None] | None = None
                   ) -> str | R2 | UserMetric:
    """The metric's name, R2 with the outputs' `layouts` (graph/outputs.py), or the user's metric
    (called once on the original against itself, so that a failing one fails before any work)."""
    if callable(metric) or (isinstance(metric, str) and ":" in metric):
        user = metric if isinstance(metric, UserMetric) else (
            UserMetric(metric) if callable(metric) else load_metric(metric))
        user(reference, reference, indices)
        return user
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if metric == "accuracy" and labels is None:
        raise ValueError("--metric accuracy needs labels (--labels)")
    if metric in ("accuracy", "agreement") and not is_classifier(reference):
        raise ValueError(f"--metric {metric} needs one (samples, classes) output")
    if labels is not None and is_classifier(reference):
        classes = reference[0].shape[1]
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"labels must be class indices 0..{classes - 1} (the model has {classes} outputs); "
                             f"got {labels.min()}..{labels.max()}")
    if metric == "auto":
        metric = "r2" if not counts_see_it(reference) else "accuracy" if labels is not None else "agreement"
    return R2(tuple(layouts or ())) if metric == "r2" else metric


def counts_see_it(reference: list[np.ndarray]) -> bool:
    """Whether counting top-1 changes measures what a classifier is used for: not for two classes
    (a score its users threshold where they choose: a content filter whose positive score stays
    near 0 on ordinary photos never changes class there, and was written 99.6x smaller at an
    agreement drop of 0 with its score destroyed), nor where the original's top-1 is one class on
    every calibration sample (no change of it to count)."""
    if not is_classifier(reference):
        return False
    scores = reference[0]
    return scores.shape[1] > 2 and len(np.unique(scores.argmax(1))) > 1


COUNTS = ("accuracy", "agreement")  # metrics that count samples: they resolve 1 / samples at best


def resolution(metric: str, samples: int, groups: np.ndarray | None, eps: float, level: float,
               holdout: float) -> tuple[str, float, str | None]:
    """What a check of `samples` held-out samples (from `groups`, if given) can resolve under
    `metric`, as a line; the level its bound is taken at (`level`, or lower where a count on so few
    cannot bound eps at `level` even with no sample changed: confidence.level_in_force); and a
    warning naming how many samples (or groups) would, where eps cannot be bounded at `level`."""
    count = None if groups is None else len(np.unique(groups))
    source = "" if count is None else f" from {count} groups"
    if metric not in COUNTS:
        if count is not None and count < MIN_GROUPS:
            return (f"{samples} held-out samples{source}", level,
                    f"the held-out part holds {count} groups (--groups): too few to bound the {metric} drop by "
                    f"resampling them ({MIN_GROUPS} would); nothing can be shown within eps, so nothing is factored")
        return f"{samples} held-out samples{source}", level, None
    n = effective_samples(samples, groups)
    worth = "" if count is None else f", worth {n:.0f} independent ones"
    least = no_change_bound(n, level)
    line = (f"{samples} held-out samples{source}{worth}: one changed sample is {1 / samples:.4f}; with none changed "
            f"the drop is at most {least:.4f} at confidence {level:g}")
    in_force = level_in_force(eps, n, level)
    if in_force == level:
        return line, level, None
    need = samples_for(eps, level)
    unit = "held-out samples" if count is None else "independent held-out samples (groups of one)"
    outcome = (f"the model written is bounded at confidence {in_force:g}" if in_force is not None else
               f"below confidence {MIN_LEVEL:g} nothing is promised, so nothing is factored")
    return line, level if in_force is None else in_force, (
        f"eps {eps:g} cannot be bounded at confidence {level:g} on {samples} held-out samples{source} under "
        f"{metric} (with no sample changed the bound is {least:.4f}): {need} {unit} would (about "
        f"{int(np.ceil(need / holdout))} calibration samples at --holdout {holdout:g}); {outcome}")


@dataclass(frozen=True)
class Quality:
    """A model's quality on one data set under one metric, and its drop from the reference."""

    metric: str
    value: float   # accuracy, or agreement / mean cosine with the original
    drop: float


def quality(metric: str | UserMetric, reference: list[np.ndarray], outputs: list[np.ndarray],
            labels: np.ndarray | None, indices: np.ndarray | None = None) -> Quality:
    """`indices`: which calibration samples these are (the user's metric may ask)."""
    if isinstance(metric, UserMetric):
        drop = metric(reference, outputs, indices)
        return Quality(str(metric), -drop, drop)  # its value: the drop's negative (0 for the original)
    # drops from sample counts, as DropMeter takes them: a difference of two means can land a
    # rounding error above an eps that the count meets exactly (0.98889 - 0.96889 > 0.02)
    n = len(labels if metric == "accuracy" else reference[0])
    if metric == "accuracy":
        before = int(np.sum(reference[0].argmax(1) == labels))
        after = int(np.sum(outputs[0].argmax(1) == labels))
        return Quality(metric, after / n, (before - after) / n)
    if metric == "agreement":
        agree = int(np.sum(reference[0].argmax(1) == outputs[0].argmax(1)))
        return Quality(metric, agree / n, (n - agree) / n)
    drop = max(float(np.mean(p)) for p in _per_output(metric, reference, outputs, channel_scales(reference, metric)))
    return Quality(metric, 1.0 - drop, drop)


def drop_bound(metric: str | UserMetric, reference: list[np.ndarray], outputs: list[np.ndarray],
               labels: np.ndarray | None, indices: np.ndarray | None, groups: np.ndarray | None, level: float,
               seed: int = 0) -> Bound:
    """The drop of `outputs` against `reference` and its upper confidence bound at `level` for new
    samples from the same distribution (confidence.py): paired counts for accuracy and agreement,
    a bootstrap over samples (whole groups, with `groups`) for the others."""
    n = len(labels if metric == "accuracy" else reference[0])
    if metric == "accuracy":
        before, after = reference[0].argmax(1) == labels, outputs[0].argmax(1) == labels
        return counts_bound(before & ~after, after & ~before, level, groups)
    if metric == "agreement":
        changed = reference[0].argmax(1) != outputs[0].argmax(1)
        return counts_bound(changed, np.zeros(n, dtype=bool), level, groups)
    if isinstance(metric, UserMetric):
        idx = np.arange(n) if indices is None else indices

        def drop_of(p: np.ndarray) -> float:
            return metric([r[p] for r in reference], [o[p] for o in outputs], idx[p])
        return bootstrap_bound(drop_of, n, level, groups, seed, USER_BOOTSTRAP)
    per_sample = np.stack(_per_output(metric, reference, outputs, channel_scales(reference, metric)), axis=1)
    return studentized_bound(per_sample, level, groups, seed, BOOTSTRAP)


OWN_FLOOR = 1e-4  # a channel's variance is taken as at least this share of its mean square: one
#                   that hardly varies (a constant computed in float32, std 1e-7 of its size)
#                   measures its errors against 1% of its size, not against its rounding noise
FLOAT_FLOOR = 1e-7  # and at least (this x the output's largest magnitude)^2, float32's resolution of it
#                     (an all-zero channel); not a share of the other channels' variance, which pixel
#                     boxes set beside class scores (a YOLO output's class channels, variance 1e-6,
#                     were floored up to 1e-6 of the boxes' variance, and their damage hidden)


LAYER_FLOOR = 1e-2  # and at least this share of the median variance of the channels its layer
#                     wrote (a text detector's link map, variance 1e-6 on photos with little text,
#                     beside its live region map: a jitter of the silent map's own size is no change
#                     of substance, and measured against its own variance it held the model back)


def _channels(a: np.ndarray, layout: Layout | None) -> np.ndarray:
    """(samples, channels, positions) float64: the channel axis moved to 1 (axis 1 without a
    layout); a (samples, features) output's every feature is one."""
    a = a.astype(np.float64)
    if layout is not None and layout.rank == a.ndim:  # (else stacked otherwise than the graph says)
        if layout.axis is None:  # one channel
            return a.reshape(len(a), 1, -1)
        a = np.moveaxis(a, layout.axis, 1)
    if a.ndim <= 2:
        return a.reshape(len(a), -1, 1)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _layers(layout: Layout | None, channels: int) -> tuple[tuple[int, int], ...]:
    """The spans of channels one layer wrote; each channel alone where the graph does not say (or
    says otherwise than the outputs measured: a model whose runs stack differently)."""
    if layout is None or layout.layers is None or layout.layers[-1][1] != channels:
        return tuple((c, c + 1) for c in range(channels))
    return layout.layers


def channel_scales(reference: list[np.ndarray], metric) -> list[tuple[np.ndarray, Layout | None] | None]:
    """Under r2, per output: per channel, the variance of the original's outputs across the
    samples about their per-position mean, pooled over the channel's positions, floored (OWN_FLOOR,
    FLOAT_FLOOR, LAYER_FLOOR), with the output's layout: no other layer's variance enters it, so
    small class scores beside pixel boxes count on their own. From one sample there is no variation
    to measure: the mean square stands in for it. Under other metrics, None per output."""
    layouts = _layouts(metric, len(reference))
    if layouts is None:
        return [None] * len(reference)
    scales = []
    for ref, layout in zip(reference, layouts):
        a = _channels(ref, layout)
        square = np.mean(np.square(a), axis=(0, 2))
        v = np.mean(np.square(a - a.mean(axis=0)), axis=(0, 2)) if len(a) > 1 else square
        floor = max((FLOAT_FLOOR * float(np.abs(a).max(initial=0.0))) ** 2, 1e-30)
        v = np.maximum(np.maximum(v, OWN_FLOOR * square), floor)
        for start, stop in _layers(layout, len(v)):
            v[start:stop] = np.maximum(v[start:stop], LAYER_FLOOR * float(np.median(v[start:stop])))
        scales.append((v, layout))
    return scales


def _per_output(metric, reference: list[np.ndarray], outputs: list[np.ndarray], scales: list) -> list[np.ndarray]:
    """Per output, what each sample adds to its drop, whose mean over the samples is the drop:
    1 - cos (cosine), or the squared error averaged over positions and channels, each channel's
    against its scale (r2: the mean over samples is 1 - R^2 averaged over the channels)."""
    per = []
    for ref, out, scale in zip(reference, outputs, scales):
        if scale is None:
            per.append(1.0 - _cosines(ref, out))
            continue
        v, layout = scale
        err = np.mean(np.square(_channels(out, layout) - _channels(ref, layout)), axis=2)  # (samples, channels)
        per.append(np.mean(err / v, axis=1))
    return per


class DropMeter:
    """The drop of candidate models against the original on one data set, for searches that only
    need to know whether it is within eps. Samples run fragile first (smallest margin between the
    original's top two classes: they flip first), in growing chunks, and a run stops as soon as
    the drop is certain to exceed eps whatever the rest would give; the value returned is then a
    lower bound, and `exact` says which. A failing model typically stops after one small chunk."""

    FIRST_CHUNK = 16

    def __init__(self, metric: str, data: CalibrationSet, reference: list[np.ndarray], eps: float,
                 batch_size: int = 64) -> None:
        self.metric, self.eps, self.batch_size = metric, eps, batch_size
        order = np.arange(len(data))
        if metric in ("accuracy", "agreement"):
            top2 = np.sort(reference[0], axis=1)[:, -2:]
            order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")
        self.data = data.take(order)
        self.reference = [r[order] for r in reference]
        self.scales = channel_scales(reference, metric)
        self.labels = self.data.labels
        self.n = len(self.data)
        self.exact = True

    def __call__(self, model: onnx.ModelProto | ort.InferenceSession | FoldedModel) -> float:
        sess = model if isinstance(model, (ort.InferenceSession, FoldedModel)) else session(model)
        names = [o.name for o in sess.get_outputs()]
        if isinstance(self.metric, UserMetric):  # no bound to stop at: every sample, every time
            return self.metric(self.reference, predict(sess, self.data, self.batch_size, names), self.data.indices)
        lost = 0.0                       # sum over the samples seen of what each adds to the drop
        per_output = np.zeros(len(names))  # r2, cosine: per output, the sum of what each sample adds
        start, size = 0, self.FIRST_CHUNK
        while start < self.n:
            stop = min(self.n, start + size)
            chunk = self.data.take(np.arange(start, stop))
            outs = predict(sess, chunk, self.batch_size, names)
            ref = [r[start:stop] for r in self.reference]
            if self.metric == "accuracy":
                y = self.labels[start:stop]
                lost += float(np.sum(ref[0].argmax(1) == y) - np.sum(outs[0].argmax(1) == y))
                # the rest can at most win back the samples the original gets wrong
                rest_wrong = float(np.sum(self.reference[0][stop:].argmax(1) != self.labels[stop:]))
                bound = (lost - rest_wrong) / self.n
            elif self.metric == "agreement":
                lost += float(np.sum(ref[0].argmax(1) != outs[0].argmax(1)))
                bound = lost / self.n
            else:
                per_output += [float(np.sum(p)) for p in _per_output(self.metric, ref, outs, self.scales)]
                bound = float(per_output.max()) / self.n
            start, size = stop, 2 * size
            if bound > self.eps and start < self.n:
                self.exact = False
                return bound
        self.exact = True
        return lost / self.n if self.metric in COUNTS else float(per_output.max()) / self.n


def _cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per sample. Two (numerically) zero vectors agree (1); a zero against a non-zero one does
    not (0): a model whose output went to zero everywhere (the PP-OCR detector with every layer at
    rank 1) is not a perfect match. Zero is a norm below 1e-6 of the largest one in the call: the
    original's sigmoid of -40 is 0.0 where its BatchNorm-folded form gives 4e-18."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    tol = 1e-6 * max(float(na.max(initial=0.0)), float(nb.max(initial=0.0)))
    za, zb = na <= tol, nb <= tol
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300)
    return np.where(~za & ~zb, cos, np.where(za & zb, 1.0, 0.0))
