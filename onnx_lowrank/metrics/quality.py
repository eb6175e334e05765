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

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.data import CalibrationSet
from ..graph.outputs import Layout
from ..runtime.sessions import FoldedModel, predict, session
from .confidence import (BOOTSTRAP, Bound, MIN_GROUPS, MIN_LEVEL, USER_BOOTSTRAP, bootstrap_bound, counts_bound,
                         effective_samples, level_in_force, no_change_bound, samples_for, studentized_bound)
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
