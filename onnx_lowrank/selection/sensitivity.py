"""How much a layer's error reaches the model's outputs. The relative output error of a layer on
its own inputs does not say how much of it survives to the model's output: measured on the digit
CNN, a conv's error reached the logits 200 times more than the first FC layer's. So each layer is
replaced alone by its candidate nearest a probe error, the model run on a small subset, and the
relative squared change of the outputs divided by the layer's squared error: one short
whole-model pass per layer."""

from __future__ import annotations

import numpy as np
import onnx

from ..calibration.data import CalibrationSet
from ..graph import replace_layers
from ..quality import predict
from .candidates import LayerProblem

PROBE_ERROR = 0.2
SUBSET = 16  # enough to rank layers by how far their error travels (measured: the same choices
# on three models as with 32); it costs one pass each


def output_distortion(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for r, o in zip(reference, outputs))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return num / max(den, 1e-300)


def sensitivities(problems: list[LayerProblem], model: onnx.ModelProto, data: CalibrationSet,
                  batch_size: int = 64) -> dict[str, float]:
    subset = data.take(np.arange(min(SUBSET, len(data))))
    reference = predict(model, subset, batch_size)
    out = {}
    for p in problems:
        probes = [c for c in p.candidates if c.factors is not None and c.error > 0]
        if not probes:
            out[p.name] = 1.0
            continue
        c = min(probes, key=lambda c: abs(np.log(c.error / PROBE_ERROR)))
        changed = predict(replace_layers(model, [(p.target, c.factors)], infer=False), subset, batch_size)
        out[p.name] = max(output_distortion(reference, changed), 1e-12) / c.error ** 2
    return out
