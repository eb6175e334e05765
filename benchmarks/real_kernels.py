"""Real trained conv kernels for the decomposition benchmarks: the digit-recognizer CNN's 3x3
convs (models/digit_cnn.onnx, exported by models/export_digit_cnn.py)."""

from __future__ import annotations

from pathlib import Path

from onnx_lowrank.decompositions import Layer
from onnx_lowrank.graph import find_targets, load_model, prepare

DIGIT_CNN = Path(__file__).resolve().parent.parent / "models" / "digit_cnn.onnx"


def digit_cnn_convs() -> list[tuple[str, Layer]]:
    targets, _ = find_targets(prepare(load_model(DIGIT_CNN)))
    return [(t.name.split("/")[-2], t.layer) for t in targets if t.op_type == "Conv"]
