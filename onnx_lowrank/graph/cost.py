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
               feed: dict[str, np.ndarray] | None = None) -> list[NodeCost]:
    """Each node's cost at the inputs' `shapes` (or `feed`'s). Where onnx's shape inference gives
    up (paddle2onnx graphs: a Reshape whose shape is computed), the shapes onnxruntime computes
    running `feed`, when given, are taken instead of refusing a model that runs."""
    if feed is not None and shapes is None:
        shapes = {k: v.shape for k, v in feed.items()}
    fixed = with_input_shapes(model, shapes)
    index = GraphIndex(fixed.graph)
    wanted = [n for node in fixed.graph.node if node.op_type in _OPERANDS or _fused_attention(node)
              for n in (node.input[0], node.input[_OPERANDS.get(node.op_type, 1)], node.output[0])]
    unknown = [n for n in dict.fromkeys(wanted) if index.static_shape(n) is None]
    measured = runtime_shapes(model, unknown, feed) if unknown and feed is not None else {}

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


def runtime_shapes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors `names` as onnxruntime computes them running `feed`."""
    from ..quality import RUNTIME_ERRORS, session
    from .downstream import with_outputs

    graph_inputs = {i.name for i in model.graph.input}
    inner = [n for n in names if n not in graph_inputs]
    try:
        values = session(with_outputs(model, inner)).run(inner, feed)
    except RUNTIME_ERRORS:  # the caller's error says which shape is missing
        return {}
    shapes = {n: tuple(v.shape) for n, v in zip(inner, values)}
    shapes.update((n, tuple(feed[n].shape)) for n in names if n in graph_inputs and n in feed)
    return shapes
