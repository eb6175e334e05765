"""Parameters and MACs counted over a graph, node by node, at concrete input shapes."""

from __future__ import annotations

import math
from typing import Callable
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
    macs: int    # multiply-accumulates of Conv / Gemm / MatMul (and their integer forms), 0 for other ops


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


def node_costs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
               measure: Callable[[list[str]], dict[str, tuple[int, ...]]] | None = None) -> list[NodeCost]:
    """Each node's cost at the inputs' `shapes`. Where onnx's shape inference gives up (paddle2onnx
    graphs: a Reshape whose shape is computed), `measure` (names -> shapes, as a run computes
    them: runtime.sessions.costs_at) is asked, when given, instead of refusing a model that runs."""
    fixed = with_input_shapes(model, shapes)
    index = GraphIndex(fixed.graph)
    wanted = [n for node in fixed.graph.node if node.op_type in _OPERANDS or _fused_attention(node)
              for n in (node.input[0], node.input[_OPERANDS.get(node.op_type, 1)], node.output[0])]
    unknown = [n for n in dict.fromkeys(wanted) if index.static_shape(n) is None]
    measured = measure(unknown) if unknown and measure is not None else {}

    def size(name: str) -> int:
        if name in index.initializers and name not in index.graph_inputs:
            t = index.initializers[name]
            return math.prod(t.dims) if t.data_type in FLOAT_TYPES else 0
        value = index.constant(name) if name in index.constant_nodes else None
        return value.size if value is not None and np.issubdtype(value.dtype, np.floating) else 0

    def dims(name: str) -> tuple[int, ...]:
        shape = index.static_shape(name) or measured.get(name)
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
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = dims(node.input[_OPERANDS[node.op_type]])
            macs = math.prod(dims(node.output[0])) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = dims(node.input[0])
            k = a[0] if trans_a else a[1]
            macs = math.prod(dims(node.output[0])) * k
        elif node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            a = dims(node.input[0])
            macs = math.prod(dims(node.output[0])) * a[-1]
        elif _fused_attention(node):
            # onnxruntime's fused Attention: the packed Q, K, V projection (width -> 3 hidden),
            # then Q K^T and the weighted sum of V over the sequence (2 S^2 hidden per sample)
            (*rows, width), (_, packed) = dims(node.input[0]), dims(node.input[1])
            batch, seq = math.prod(rows[:-1]), rows[-1]
            macs = batch * seq * width * packed + 2 * batch * seq * seq * (packed // 3)
        costs.append(NodeCost(node.name, node.op_type, params, macs))
    return costs


# the ops counted, and where their second operand (the weight) is; the integer forms are what
# onnxruntime's quantizer writes (dynamic: ConvInteger, MatMulInteger; QOperator: QLinear*)
_OPERANDS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvInteger": 1, "MatMulInteger": 1, "QLinearConv": 3,
             "QLinearMatMul": 3}


def _fused_attention(node: onnx.NodeProto) -> bool:
    return node.op_type == "Attention" and node.domain == "com.microsoft"
