"""The --select strategies behind one call."""

from __future__ import annotations

import onnx

from ..calibration.capture import activation_name
from ..calibration.data import CalibrationSet
from ..config import CompressConfig
from ..graph.targets import LayerTarget
from . import auto, cosine, energy, fixed, hessian, vbmf
from .search import Choice, Search
from .sensitivity import sensitivities


def select(config: CompressConfig, search: Search, prepared: onnx.ModelProto, data: CalibrationSet,
           targets: list[LayerTarget]) -> tuple[Choice, dict[str, str]]:
    if config.select == "auto":
        return auto.select(search, sensitivities(search.problems, prepared, data))
    if config.select == "rank":
        return fixed.select(search, config.methods, config.rank, config.ratio, config.cost)
    if config.select == "energy":
        return energy.select(search, config.energy)
    if config.select == "vbmf":
        return vbmf.select(search, config.methods, config.cost)
    if config.select == "cosine":
        inputs = {t.name: activation_name(t) for t in targets}
        return cosine.select(search, prepared, config.methods, inputs)
    return hessian.select(search, prepared, data, config.methods, config.seed)

