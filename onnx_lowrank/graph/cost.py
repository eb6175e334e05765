"""Parameters and MACs counted over a graph, node by node, at concrete input shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InvalidModel
from .index import FLOAT_TYPES, GraphIndex
from .prepare import infer_shapes


@dataclass(frozen=True)
class NodeCost:
    name: str
    op_type: str
    params: int  # elements of the floating-point constants the node reads
    macs: int    # multiply-accumulates of Conv / Gemm / MatMul, 0 for other ops


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy whose graph inputs have concrete shapes: those given, every other unknown dim 1 (one
    sample), and shapes inferred through the graph."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    shapes = shapes or {}
    initializers = {t.name for t in fixed.graph.initializer}
    for inp in fixed.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        given = shapes.get(inp.name)
        for i, d in enumerate(dims):
            value = given[i] if given is not None else (d.dim_value if d.HasField("dim_value") else 1)
            d.Clear()
            d.dim_value = int(value)
    del fixed.graph.value_info[:]
    return infer_shapes(fixed)


def node_costs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> list[NodeCost]:
    fixed = with_input_shapes(model, shapes)
    index = GraphIndex(fixed.graph)

    def size(name: str) -> int:
        if name in index.initializers and name not in index.graph_inputs:
            t = index.initializers[name]
            return math.prod(t.dims) if t.data_type in FLOAT_TYPES else 0
        value = index.constant(name) if name in index.constant_nodes else None
        return value.size if value is not None and np.issubdtype(value.dtype, np.floating) else 0

    def dims(name: str) -> tuple[int, ...]:
        shape = index.static_shape(name)
        if shape is None:
            raise InvalidModel(f"the shape of {name!r} cannot be inferred at the calibration inputs' shapes: "
                               "do the shapes the model declares contradict its graph?")
        return shape

    costs = []
    for node in fixed.graph.node:
        if node.op_type == "Constant":
            continue
        params = sum(size(n) for n in node.input if n)
        macs = 0
        if node.op_type == "Conv":
            w = dims(node.input[1])
            macs = math.prod(dims(node.output[0])) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = dims(node.input[0])
            k = a[0] if trans_a else a[1]
            macs = math.prod(dims(node.output[0])) * k
        elif node.op_type == "MatMul":
            a = dims(node.input[0])
            macs = math.prod(dims(node.output[0])) * a[-1]
        costs.append(NodeCost(node.name, node.op_type, params, macs))
    return costs
