"""The user's own metric: a function of the original's outputs and the candidate's that returns
the drop (`--metric module:function` or `path.py:function`; `metric=fn` in Python)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MetricError, first_line
from .base import Measure, Metric
from .confidence import USER_BOOTSTRAP, bootstrap_bound


class UserMetric(Metric):
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

    def against(self, reference, labels=None, indices=None) -> Measure:
        return _UserMeasure(self, reference, labels, indices)

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
        raise MetricError(f"--metric {spec!r}: give a name (auto, accuracy, agreement, r2, cosine), module:function or "
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


class _UserMeasure(Measure):
    """Your metric is a function of the whole set, not a mean over samples: no early stop, and
    its bound is a percentile bootstrap of it (confidence.py)."""

    samplewise = False

    def drop(self, outputs):
        return self.metric(self.reference, outputs, self.indices)

    def value(self, outputs, drop):
        return -drop  # (0 for the original)

    def bound(self, outputs, groups, level, seed=0):
        def drop_of(p: np.ndarray) -> float:
            return self.metric([r[p] for r in self.reference], [o[p] for o in outputs], self.indices[p])
        return bootstrap_bound(drop_of, self.n, level, groups, seed, USER_BOOTSTRAP)
