"""ONNX graph handling: load/save, prepare, target discovery, rewrite, cost counting."""

from .cost import NodeCost, node_costs
from .io import load_model, save_model
from .prepare import prepare
from .rewrite import replace_layers
from .targets import LayerTarget, Skipped, find_targets

__all__ = ["load_model", "save_model", "prepare", "find_targets", "LayerTarget", "Skipped",
           "replace_layers", "node_costs", "NodeCost"]
