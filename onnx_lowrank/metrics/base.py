"""The protocol every metric follows. A Metric, fitted to the original's outputs on a set
(`against`), is a Measure: what each sample adds to the drop of a model's outputs on that set,
the drop itself, the model's quality, and the drop's upper confidence bound for new samples. The
whole-set measurement (quality.quality, quality.drop_bound) and the early-stopping meter
(quality.DropMeter) both read it, so each metric is written once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .confidence import BOOTSTRAP, Bound, studentized_bound


@dataclass(frozen=True)
class Quality:
    """A model's quality on one data set under one metric, and its drop from the reference."""

    metric: str
    value: float   # accuracy, agreement, 1 - the drop (r2, cosine), or the drop's negative (yours)
    drop: float


class Metric:
    """What --eps bounds. `name` is what the report and the CLI call it; `counts`: it counts
    samples (it resolves one sample in n at best)."""

    name = ""
    counts = False

    def against(self, reference: list[np.ndarray], labels: np.ndarray | None = None,
                indices: np.ndarray | None = None) -> "Measure":
        """The metric fitted to the original's outputs on a set (`reference`, one array per graph
        output, samples along axis 0), with the set's `labels` and its samples' `indices` in the
        calibration set (for the user's metric)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:  # f-strings name it
        return format(self.name, spec)


class Measure:
    """A metric fitted to the original's outputs on one set. For a metric that is a mean over
    samples (`samplewise`), `per_sample` gives what each sample adds to each part's drop (parts:
    the graph outputs for r2 and cosine, one for counts) and the drop is the largest part's mean;
    `least` is the least a set of samples can add, whatever the model (DropMeter stops on it)."""

    samplewise = True

    def __init__(self, metric: Metric, reference: list[np.ndarray], labels: np.ndarray | None,
                 indices: np.ndarray | None) -> None:
        self.metric, self.reference, self.labels = metric, reference, labels
        self.n = len(reference[0])
        self.indices = np.arange(self.n) if indices is None else indices

    def per_sample(self, outputs: list[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """(samples, parts): what each sample adds to each part's drop; `outputs` are the model's
        on the samples at `rows` of the set (default: all of them, in order)."""
        raise NotImplementedError

    def least(self, rows: np.ndarray) -> np.ndarray:
        """Per part (or one value for all parts), the least the samples at `rows` can add to the
        sum: 0 unless a model can gain there (accuracy: the samples the original gets wrong)."""
        return np.zeros(1)

    def order(self) -> np.ndarray:
        """The order a meter runs the samples in: those likeliest to change first."""
        return np.arange(self.n)

    def drop(self, outputs: list[np.ndarray]) -> float:
        # the largest part's sum over n: for counts an integer over n, as a meter adds it up (a
        # difference of two means can land a rounding error above an eps a count meets exactly)
        return float(np.max(np.sum(self.per_sample(outputs), axis=0))) / self.n

    def value(self, outputs: list[np.ndarray], drop: float) -> float:
        """The model's quality, reported beside the drop."""
        return 1.0 - drop

    def quality(self, outputs: list[np.ndarray]) -> Quality:
        drop = self.drop(outputs)
        return Quality(str(self.metric), self.value(outputs, drop), drop)

    def bound(self, outputs: list[np.ndarray], groups: np.ndarray | None, level: float, seed: int = 0) -> Bound:
        """The drop and its upper confidence bound at `level` for new samples from the same
        distribution: a studentized bootstrap over samples (whole groups, with `groups`) of the
        per-sample contributions, the worst part counting (confidence.py)."""
        return studentized_bound(self.per_sample(outputs), level, groups, seed, BOOTSTRAP)
