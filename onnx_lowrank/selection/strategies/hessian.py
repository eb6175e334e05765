"""`--select hessian`: Yang & Liu's sensitivity. Each layer's sensitivity is the trace of the Hessian of
the loss with respect to its weights (Hutchinson's estimator, Hessian-vector products by double
backprop through the PyTorch bridge). Ranks are set around an average in proportion to it: a
layer gets the fraction f * s / mean(s) of its cost (at most all of it), and the average fraction
f is set by binary search to the cheapest that keeps the measured drop within eps."""

from __future__ import annotations

import numpy as np
import onnx

from ...calibration.data import CalibrationSet
from ..search import Context, Search, Selection, cheapest_within

HESSIAN_SAMPLES = 128  # Hutchinson's estimate averages over probes and samples; this many is plenty


def layer_traces(model: onnx.ModelProto, names: list[str], data: CalibrationSet, seed: int) -> dict[str, float]:
    """Yang & Liu's sensitivity of each named layer: its Hessian trace on the first HESSIAN_SAMPLES of `data`."""
    from ...bridge import hessian_traces, require_torch

    require_torch()
    subset = data.take(np.arange(min(HESSIAN_SAMPLES, len(data))))
    return hessian_traces(model, names, subset.inputs, subset.labels, probes=8, seed=seed)


def select(search: Search, ctx: Context) -> Selection:
    methods = ctx.methods
    names = [p.name for p in search.problems]
    traces = layer_traces(ctx.prepared, names, ctx.data, ctx.seed)
    s = np.array([max(float(traces[n]), 0.0) for n in names])
    share = s / s.mean() if s.mean() > 0 else np.ones_like(s)
    top = 1 / max(share[share > 0].min(), 1e-12) if np.any(share > 0) else 1.0
    averages = np.geomspace(1 / 64, max(top, 1.0), 60)[::-1]  # from keep-all to the cheapest
    path, knobs = [], []
    for f in averages:
        choice = {}
        for p, sh in zip(search.problems, share):
            m = p.preferred(methods)
            choice[p.name] = p.keep if m is None else p.at_fraction(m, min(1.0, max(f * sh, 1 / 64)))
        path.append(choice)
        knobs.append(f"average={f:.4f}")
    k = cheapest_within(search, path, knobs)
    reasons = {n: f"Hessian trace {traces[n]:.3g}: {min(1.0, averages[k] * sh):.3f} of the layer's cost"
               for n, sh in zip(names, share)}
    return Selection(path[k], reasons)
