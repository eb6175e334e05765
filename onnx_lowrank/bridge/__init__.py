"""The PyTorch bridge: the ONNX model as a torch module (onnx2torch), for fine-tuning and for
Yang & Liu's Hessian-trace layer sensitivity. torch and onnx2torch are optional (pip install
'onnx-lowrank[torch]'): importing this package does not import them; each function does, and
says how to install them when they are missing."""

from .convert import LayerWeight, layer_weights, prepare_for_onnx2torch, to_torch, write_back
from .deps import require_torch
from .hessian import hessian_traces

__all__ = ["LayerWeight", "hessian_traces", "layer_weights", "prepare_for_onnx2torch", "require_torch",
           "to_torch", "write_back"]
