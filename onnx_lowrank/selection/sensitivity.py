"""How much a layer's error reaches the model's outputs. The relative output error of a layer on
its own inputs does not say how much of it survives to the model's output: measured on the digit
CNN, a conv's error reached the logits 200 times more than the first FC layer's. So each layer is
replaced alone by its candidate nearest a probe error, the model run on a small subset, and the
relative squared change of the outputs divided by the layer's squared error: one short pass per
layer, of the part of the model downstream of it."""

from __future__ import annotations

import numpy as np
import onnx

from ..calibration.data import CalibrationSet
from ..graph import replace_layers
from ..graph.downstream import downstream, downstream_model, with_outputs
from ..graph.io import weights_apart
from ..runtime.sessions import session
from .candidates import LayerProblem

PROBE_ERROR = 0.2
SUBSET = 16  # enough to rank layers by how far their error travels (measured: the same choices
# on three models as with 32); it costs one pass each


def _squared(reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[float, float]:
    """The squared change of the outputs, and their squared size."""
    num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for r, o in zip(reference, outputs))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return num, den


def output_distortion(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    num, den = _squared(reference, outputs)
    return num / max(den, 1e-300)


def sensitivities(problems: list[LayerProblem], model: onnx.ModelProto, data: CalibrationSet) -> dict[str, float]:
    """Each layer's probe runs only the part of the model downstream of it, fed with the tensors
    at that part's frontier from a run of the whole model on the same batch (about half the work,
    on average, of running everything again). Run by run, in the batches the model takes: a
    frontier tensor need not be batch-major (a shape computed upstream), so values of several
    runs could not be joined."""
    subset = data.take(np.arange(min(SUBSET, len(data))))
    outputs = [o.name for o in model.graph.output]
    parts = {p.name: downstream(model.graph, p.target.node) for p in problems}
    inner = list(dict.fromkeys(n for part in parts.values() for n in part.frontier if n not in subset.inputs))
    # the weights set apart once: every probe's sub-model is built of stubs, not of copies of them
    light, names, arrays = weights_apart(model)
    weights = dict(zip(names, arrays))
    full = session(with_outputs(light, inner), weights=weights)
    runs = []
    for feed, _ in subset.batches(SUBSET):
        values = dict(zip(outputs + inner, full.run(outputs + inner, feed)))
        values.update(feed)
        runs.append(values)
    del full  # its weights: the probes below build sessions of their own
    out = {}
    for p in problems:
        probes = [c for c in p.candidates if c.factored and c.error > 0]
        if not probes:
            out[p.name] = 1.0
            continue
        c = min(probes, key=lambda c: abs(np.log(c.error / PROBE_ERROR)))
        part = parts[p.name]
        sub = None
        num = den = 0.0
        for values in runs:
            feeds = {n: values[n] for n in part.frontier}
            if sub is None:  # typed from the first run's feeds: their dtypes and ranks do not change
                sub = session(replace_layers(downstream_model(light, part, feeds), [(p.target, c.factors)],
                                             infer=False, copy=False).model, weights=weights)
            changed = dict(zip(part.outputs, sub.run(part.outputs, feeds)))
            n, d = _squared([values[n] for n in outputs], [changed.get(n, values[n]) for n in outputs])
            num, den = num + n, den + d
        out[p.name] = max(num / max(den, 1e-300), 1e-12) / c.error ** 2
    return out
