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
from ..quality import session
from .candidates import LayerProblem

PROBE_ERROR = 0.2
SUBSET = 16  # enough to rank layers by how far their error travels (measured: the same choices
# on three models as with 32); it costs one pass each


def output_distortion(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for r, o in zip(reference, outputs))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return num / max(den, 1e-300)


def sensitivities(problems: list[LayerProblem], model: onnx.ModelProto, data: CalibrationSet) -> dict[str, float]:
    """Each layer's probe runs only the part of the model downstream of it, fed with the tensors
    at that part's frontier from one run of the whole model (about half the work, on average,
    of running everything again)."""
    subset = data.take(np.arange(min(SUBSET, len(data))))
    outputs = [o.name for o in model.graph.output]
    parts = {p.name: downstream(model.graph, p.target.node) for p in problems}
    inner = list(dict.fromkeys(n for part in parts.values() for n in part.frontier if n not in subset.inputs))
    # one run over the whole subset, not batches: a frontier tensor need not be batch-major (a
    # shape computed upstream), so values of several batches could not be joined
    values = dict(zip(outputs + inner, session(with_outputs(model, inner)).run(outputs + inner, subset.inputs)))
    values.update(subset.inputs)
    reference = [values[n] for n in outputs]
    out = {}
    for p in problems:
        probes = [c for c in p.candidates if c.factors is not None and c.error > 0]
        if not probes:
            out[p.name] = 1.0
            continue
        c = min(probes, key=lambda c: abs(np.log(c.error / PROBE_ERROR)))
        part = parts[p.name]
        feeds = {n: values[n] for n in part.frontier}
        sub = replace_layers(downstream_model(model, part, feeds), [(p.target, c.factors)], infer=False)
        changed = dict(zip(part.outputs, session(sub).run(part.outputs, feeds)))
        out[p.name] = max(output_distortion(reference, [changed.get(n, values[n]) for n in outputs]), 1e-12) / c.error ** 2
    return out
