"""Model quality, measured end to end in onnxruntime: what `--eps` bounds.

- accuracy  (labels given): the drop in top-1 accuracy, 0.005 = half a point (Phan et al.'s EPS);
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

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.data import CalibrationSet
from ..graph.outputs import Layout
from ..runtime.sessions import FoldedModel, predict, session
from .base import Measure, Metric, Quality
from .confidence import (MIN_GROUPS, MIN_LEVEL, Bound, counts_bound, effective_samples, level_in_force,
                         no_change_bound, samples_for)
from .user import UserMetric, load_metric

METRICS = ("auto", "accuracy", "agreement", "r2", "cosine")


def is_classifier(outputs: list[np.ndarray]) -> bool:
    """One (samples, classes) output that is not an embedding. Rows of unit length are embeddings
    (a sentence embedder's L2-normalised pooling): their argmax is no class, so r2 measures them.
    Probabilities of a confident classifier have rows of nearly unit length too, but no negatives."""
    if not (len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1):
        return False
    out = outputs[0].astype(np.float64)
    return not (np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3) and (out < 0).any())


def resolve_metric(metric: str | Callable, reference: list[np.ndarray], labels: np.ndarray | None,
                   indices: np.ndarray | None = None, layouts: list[Layout | None] | None = None
                   ) -> Metric:
    """The metric asked for (`auto`: the one the outputs call for); R2 with the outputs' `layouts`
    (graph/outputs.py); the user's metric is called once on the original against itself, so that a
    failing one fails before any work."""
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
    return R2(tuple(layouts or ())) if metric == "r2" else named(metric)


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


def resolution(metric: str | Metric, samples: int, groups: np.ndarray | None, eps: float, level: float,
               holdout: float) -> tuple[str, float, str | None]:
    """What a check of `samples` held-out samples (from `groups`, if given) can resolve under
    `metric`, as a line; the level its bound is taken at (`level`, or lower where a count on so few
    cannot bound eps at `level` even with no sample changed: confidence.level_in_force); and a
    warning naming how many samples (or groups) would, where eps cannot be bounded at `level`."""
    count = None if groups is None else len(np.unique(groups))
    source = "" if count is None else f" from {count} groups"
    metric = named(metric)
    if not metric.counts:
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


def named(metric: str | Metric) -> Metric:
    """The metric a name stands for (r2 without output layouts); a Metric as it is."""
    if isinstance(metric, Metric):
        return metric
    known = {"accuracy": Accuracy, "agreement": Agreement, "r2": R2, "cosine": Cosine}
    if metric not in known:
        raise ValueError(f"metric must be one of {', '.join(known)}; got {metric!r}")
    return known[metric]()


def quality(metric: str | Metric, reference: list[np.ndarray], outputs: list[np.ndarray],
            labels: np.ndarray | None, indices: np.ndarray | None = None) -> Quality:
    """The quality and drop of `outputs` against `reference` under `metric`; `indices`: which
    calibration samples these are (the user's metric may ask)."""
    return named(metric).against(reference, labels, indices).quality(outputs)


def drop_bound(metric: str | Metric, reference: list[np.ndarray], outputs: list[np.ndarray],
               labels: np.ndarray | None, indices: np.ndarray | None, groups: np.ndarray | None, level: float,
               seed: int = 0) -> Bound:
    """The drop of `outputs` against `reference` and its upper confidence bound at `level` for new
    samples from the same distribution (confidence.py)."""
    return named(metric).against(reference, labels, indices).bound(outputs, groups, level, seed)


class Accuracy(Metric):
    """The drop in top-1 accuracy against `--labels` (0.005 = half a point): samples lost less
    samples gained, paired over the same samples."""

    name, counts = "accuracy", True

    def against(self, reference, labels=None, indices=None) -> Measure:
        return _AccuracyMeasure(self, reference, labels, indices)


class _AccuracyMeasure(Measure):
    def __init__(self, metric, reference, labels, indices):
        super().__init__(metric, reference, labels, indices)
        self.right = reference[0].argmax(1) == labels

    def _changes(self, outputs, rows):
        rows = np.arange(self.n) if rows is None else rows
        right, now = self.right[rows], outputs[0].argmax(1) == self.labels[rows]
        return right & ~now, now & ~right  # lost, gained

    def per_sample(self, outputs, rows=None):
        lost, gained = self._changes(outputs, rows)
        return (lost.astype(np.float64) - gained)[:, None]

    def least(self, rows):
        return -np.array([float(np.sum(~self.right[rows]))])  # the rest can win back what the original gets wrong

    def order(self):
        return _fragile_first(self.reference[0])

    def value(self, outputs, drop):
        return float(np.sum(outputs[0].argmax(1) == self.labels)) / self.n

    def bound(self, outputs, groups, level, seed=0):
        lost, gained = self._changes(outputs, None)
        return counts_bound(lost, gained, level, groups)


class Agreement(Metric):
    """The share of samples whose top-1 class changes (no labels)."""

    name, counts = "agreement", True

    def against(self, reference, labels=None, indices=None) -> Measure:
        return _AgreementMeasure(self, reference, labels, indices)


class _AgreementMeasure(Measure):
    def per_sample(self, outputs, rows=None):
        top = self.reference[0].argmax(1)
        top = top if rows is None else top[rows]
        return (top != outputs[0].argmax(1)).astype(np.float64)[:, None]

    def order(self):
        return _fragile_first(self.reference[0])

    def bound(self, outputs, groups, level, seed=0):
        changed = self.per_sample(outputs)[:, 0] > 0
        return counts_bound(changed, np.zeros(self.n, dtype=bool), level, groups)


def _fragile_first(scores: np.ndarray) -> np.ndarray:
    """Samples by the margin between the original's top two classes, smallest first: they flip first."""
    top2 = np.sort(scores, axis=1)[:, -2:]
    return np.argsort(top2[:, 1] - top2[:, 0], kind="stable")


class R2(Metric):
    """1 - R^2 per output channel, averaged over the channels, the worst output counting; each
    output read with its Layout from the graph (graph/outputs.py; None, or none given: axis 1,
    each channel alone)."""

    name = "r2"

    def __init__(self, layouts: tuple[Layout | None, ...] = ()) -> None:
        self.layouts = layouts

    def against(self, reference, labels=None, indices=None) -> Measure:
        return _R2Measure(self, reference, labels, indices)


class _R2Measure(Measure):
    def __init__(self, metric, reference, labels, indices):
        super().__init__(metric, reference, labels, indices)
        layouts = metric.layouts if len(metric.layouts) == len(reference) else (None,) * len(reference)
        self.scales = [(_scale(r, layout), layout) for r, layout in zip(reference, layouts)]

    def per_sample(self, outputs, rows=None):
        parts = []
        for ref, out, (v, layout) in zip(self.reference, outputs, self.scales):
            ref = ref if rows is None else ref[rows]
            err = np.mean(np.square(_channels(out, layout) - _channels(ref, layout)), axis=2)  # (samples, channels)
            parts.append(np.mean(err / v, axis=1))
        return np.stack(parts, axis=1)


class Cosine(Metric):
    """1 - the mean cosine similarity per sample, the worst output counting. It can be fooled: a
    detector's class scores zeroed beside pixel boxes on a constant grid kept 0.99."""

    name = "cosine"

    def against(self, reference, labels=None, indices=None) -> Measure:
        return _CosineMeasure(self, reference, labels, indices)


class _CosineMeasure(Measure):
    def per_sample(self, outputs, rows=None):
        refs = self.reference if rows is None else [r[rows] for r in self.reference]
        return np.stack([1.0 - _cosines(r, o) for r, o in zip(refs, outputs)], axis=1)


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


def _scale(ref: np.ndarray, layout: Layout | None) -> np.ndarray:
    """Per channel of one output: the variance of the original's outputs across the samples about
    their per-position mean, pooled over the channel's positions, floored (OWN_FLOOR, FLOAT_FLOOR,
    LAYER_FLOOR): no other layer's variance enters it, so small class scores beside pixel boxes
    count on their own. From one sample there is no variation to measure: the mean square stands
    in for it."""
    a = _channels(ref, layout)
    square = np.mean(np.square(a), axis=(0, 2))
    v = np.mean(np.square(a - a.mean(axis=0)), axis=(0, 2)) if len(a) > 1 else square
    floor = max((FLOAT_FLOOR * float(np.abs(a).max(initial=0.0))) ** 2, 1e-30)
    v = np.maximum(np.maximum(v, OWN_FLOOR * square), floor)
    for start, stop in _layers(layout, len(v)):
        v[start:stop] = np.maximum(v[start:stop], LAYER_FLOOR * float(np.median(v[start:stop])))
    return v


class DropMeter:
    """The drop of candidate models against the original on one data set, for searches that only
    need to know whether it is within eps. Samples run in the metric's order (counts: fragile
    first, the smallest margin between the original's top two classes: they flip first), in
    growing chunks, and a run stops as soon as the drop is certain to exceed eps whatever the rest
    would give (Measure.least); the value returned is then a lower bound, and `exact` says which.
    A failing model typically stops after one small chunk. The user's metric, a function of the
    whole set, has no such bound: it runs every sample every time."""

    FIRST_CHUNK = 16

    def __init__(self, metric: str | Metric, data: CalibrationSet, reference: list[np.ndarray], eps: float,
                 batch_size: int = 64) -> None:
        self.eps, self.batch_size = eps, batch_size
        self.measure = named(metric).against(reference, data.labels, data.indices)
        self.source = data
        self.order = self.measure.order()  # the samples in the order they run: self.data[i] is source[order[i]]
        self.data = data.take(self.order)
        self.n = len(self.data)
        self.exact = True

    def __call__(self, model: onnx.ModelProto | ort.InferenceSession | FoldedModel) -> float:
        sess = model if isinstance(model, (ort.InferenceSession, FoldedModel)) else session(model)
        names = [o.name for o in sess.get_outputs()]
        self.exact = True
        if not self.measure.samplewise:
            return self.measure.drop(predict(sess, self.source, self.batch_size, names))
        sums = None  # per part, the sum over the samples seen of what each adds to the drop
        start, size = 0, self.FIRST_CHUNK
        while start < self.n:
            stop = min(self.n, start + size)
            outs = predict(sess, self.data.take(np.arange(start, stop)), self.batch_size, names)
            added = np.sum(self.measure.per_sample(outs, self.order[start:stop]), axis=0)
            sums = added if sums is None else sums + added
            start, size = stop, 2 * size
            bound = float(np.max(sums + self.measure.least(self.order[start:]))) / self.n
            if bound > self.eps and start < self.n:
                self.exact = False
                return bound
        return float(np.max(sums)) / self.n


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
