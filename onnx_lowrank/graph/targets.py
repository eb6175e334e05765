"""Target discovery: every Conv, Gemm and MatMul of the main graph becomes either a
`LayerTarget` (its weight as a pure-numpy `Layer` plus what the rewrite needs) or a `Skipped`
with the reason, as onnxscript's rewrite rules decline in `check`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..decompositions.base import ConvGeometry, Layer
from .index import GraphIndex, node_attrs

TARGET_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(eq=False)
class LayerTarget:
    name: str                 # the node's name (or its output's, for unnamed nodes)
    op_type: str              # Conv, Gemm or MatMul
    node: onnx.NodeProto = field(repr=False)
    layer: Layer = field(repr=False)
    dtype: np.dtype           # the weight's dtype; the factors are written back in it
    input_shape: tuple | None  # of the activation input, as inferred
    weight_side: str = "right"         # MatMul: X @ W ("right") or W @ X ("left")
    bias_add: onnx.NodeProto | None = None  # MatMul + Add(bias), as Keras/TF export dense layers
    gemm_c: tuple[str, float] | None = None  # Gemm's non-constant C and beta, kept as they are
    absorbed: list[str] = field(default_factory=list)  # tensor names the rewrite makes unused

    @property
    def activation(self) -> str:
        """The tensor the weight multiplies: a MatMul's with the weight on the left reads input 1."""
        return self.node.input[1] if self.op_type == "MatMul" and self.weight_side == "left" else self.node.input[0]

    @property
    def output(self) -> str:
        return self.bias_add.output[0] if self.bias_add is not None else self.node.output[0]

    @property
    def inputs_in_columns(self) -> bool:
        """Whether the activation holds the layer's input vectors as columns (MatMul W @ X, Gemm
        with transA=1) rather than as rows."""
        if self.op_type == "Gemm":
            return bool(node_attrs(self.node).get("transA", 0))
        return self.op_type == "MatMul" and self.weight_side == "left"

    @property
    def in_spatial(self) -> tuple[int, ...] | None:
        """What `Layer.macs` takes for one sample, from the inferred input shape (None if
        unknown): a conv's input spatial size; a dense layer's rows per sample."""
        shape = self.input_shape
        if shape is None:
            return None
        if self.op_type == "Conv":
            spatial = shape[2:]
        elif self.op_type == "Gemm":
            return (1,)
        elif self.weight_side == "right":
            spatial = shape[1:-1]  # (batch, ..., K): the middle dims are rows of one sample
        else:
            spatial = shape[-1:] + shape[1:-2]  # W @ (batch, ..., K, N)
        if not all(isinstance(d, int) and d > 0 for d in spatial):
            return None
        return (math.prod(spatial),) if self.op_type != "Conv" else tuple(spatial)

    def macs(self) -> int | None:
        spatial = self.in_spatial
        return None if spatial is None else self.layer.macs(spatial)


@dataclass(frozen=True)
class Skipped:
    name: str
    op_type: str
    reason: str


# onnxruntime's fused ops that hold a projection's weight inside them (the transformer optimizer's
# Attention packs Q, K and V into one (hidden, 3 * hidden) input): factoring one would undo the
# fusion, which is worth more than the MACs (benchmarks/minilm_exports.py)
FUSED_PROJECTIONS = {"Attention", "QAttention", "PackedAttention", "FusedMatMul", "FusedGemm",
                     "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
FUSED_REASON = ("fused by onnxruntime's optimizer, its projections packed inside: kept whole, so the fusion "
                "stays (the layers around it are factored; to factor Q, K and V too, give the model as "
                "exported, before the optimizer, which then cannot fuse those blocks)")


# what lies between an attention block's projections and its two products of activations in the
# exports seen (PyTorch legacy and dynamo, optimum): head split / merge and the score scaling
_ATTENTION_PATH = {"Add", "Reshape", "Transpose", "Mul", "Div", "Cast", "Squeeze", "Unsqueeze"}
_ATTENTION_HOPS = 6


def attention_projections(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Those of the MatMul/Gemm nodes `names` that are an attention block's projections: their
    output reaches a MatMul of two activations (Q, K and V), or their input comes from one (the
    output projection), through head reshapes and scalings only. onnxruntime's transformer
    optimizer fuses a block only while all four are single MatMuls."""
    index = GraphIndex(model.graph)

    def product(node: onnx.NodeProto) -> bool:  # Q K^T, or the weights times V
        return node.op_type == "MatMul" and not any(index.is_constant(i) for i in node.input)

    def reaches(start: onnx.NodeProto, forward: bool) -> bool:
        frontier, seen = [start], set()
        for _ in range(_ATTENTION_HOPS):
            step = []
            for node in frontier:
                nexts = ([c for o in node.output for c in index.consumers.get(o, [])] if forward else
                         [index.producer[i] for i in node.input if i in index.producer])
                for n in nexts:
                    if product(n):
                        return True
                    if n.op_type in _ATTENTION_PATH and id(n) not in seen:
                        seen.add(id(n))
                        step.append(n)
            frontier = step
        return False

    return {node_name(n) for n in model.graph.node
            if node_name(n) in names and (reaches(n, True) or reaches(n, False))}


def node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}:{node.output[0]}"


def find_targets(model: onnx.ModelProto) -> tuple[list[LayerTarget], list[Skipped]]:
    """Targets and skips of a prepared model (shapes inferred), in graph order."""
    index = GraphIndex(model.graph)
    targets, skipped = [], []
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in FUSED_PROJECTIONS:
            skipped.append(Skipped(node_name(node), f"{node.domain}.{node.op_type}", FUSED_REASON))
            continue
        if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
            continue
        found = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}[node.op_type](index, node)
        if isinstance(found, str):
            skipped.append(Skipped(node_name(node), node.op_type, found))
        else:
            targets.append(found)
    return targets, skipped


def _weight(index: GraphIndex, name: str, activation: str) -> np.ndarray | str:
    """The constant weight called `name` of a layer reading `activation`, or why the layer cannot
    be factored."""
    producer = index.producer.get(activation)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return "quantized (QDQ) layer: its input is dequantized at run time"
    if name in index.graph_inputs:
        return "weight is a graph input (it can be fed at run time)"
    producer = index.producer.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return "quantized (QDQ) layer: its weight is dequantized at run time"
    value = index.constant(name)
    if value is None:
        return "weight is not a constant"
    if index.uses(name) > 1:
        return "weight is shared with another node or a subgraph"
    if value.dtype not in FLOAT_DTYPES:
        return f"weight dtype {value.dtype} is not floating point"
    if not np.all(np.isfinite(value)):
        return "weight contains NaN or Inf"
    return value


def _conv(index: GraphIndex, node: onnx.NodeProto) -> LayerTarget | str:
    weight = _weight(index, node.input[1], node.input[0])
    if isinstance(weight, str):
        return weight
    ndim = weight.ndim - 2
    if ndim not in (1, 2, 3):
        return f"{ndim}-D convolution: only 1-D, 2-D and 3-D are factored"
    absorbed = [node.input[1]]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = index.constant(node.input[2])
        if bias is None:
            return "bias is not a constant"
        if index.uses(node.input[2]) > 1:
            return "bias is shared with another node"
        absorbed.append(node.input[2])
    attrs = node_attrs(node)
    kernel = tuple(weight.shape[2:])
    if tuple(attrs.get("kernel_shape", kernel)) != kernel:
        return "kernel_shape attribute disagrees with the weight"
    strides = tuple(attrs.get("strides", (1,) * ndim))
    dilations = tuple(attrs.get("dilations", (1,) * ndim))
    pads = tuple(attrs.get("pads", (0,) * (2 * ndim)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    input_shape = index.shape(node.input[0])
    if auto_pad == "VALID":
        pads, auto_pad = (0,) * (2 * ndim), "NOTSET"
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = None if input_shape is None else input_shape[2:]
        if spatial is not None and all(isinstance(d, int) and d > 0 for d in spatial):
            pads, auto_pad = same_pads(spatial, kernel, strides, dilations, auto_pad), "NOTSET"
    geometry = ConvGeometry(kernel, strides, dilations, pads, auto_pad)
    layer = Layer(weight, bias, geometry, int(attrs.get("group", 1)))
    return LayerTarget(node_name(node), "Conv", node, layer, weight.dtype, input_shape,
                       absorbed=absorbed)


def same_pads(spatial, kernel, strides, dilations, auto_pad: str) -> tuple[int, ...]:
    """Explicit pads equal to SAME_UPPER / SAME_LOWER for a known input size (ONNX Conv spec:
    the odd pixel goes at the end for UPPER, at the beginning for LOWER)."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def _gemm(index: GraphIndex, node: onnx.NodeProto) -> LayerTarget | str:
    if index.is_constant(node.input[0]) and not index.is_constant(node.input[1]):
        return "the constant is Gemm's A input; only a constant B is factored"
    weight = _weight(index, node.input[1], node.input[0])
    if isinstance(weight, str):
        return weight
    attrs = node_attrs(node)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    b = weight.T if attrs.get("transB", 0) else weight            # (K, N)
    matrix = (alpha * b.astype(np.float64)).T                    # (N, K) = (out, in)
    n = matrix.shape[0]
    absorbed = [node.input[1]]
    bias, gemm_c = None, None
    if len(node.input) > 2 and node.input[2]:
        c_name = node.input[2]
        c = index.constant(c_name)
        if c is None:
            gemm_c = (c_name, beta)
        elif index.uses(c_name) > 1:
            return "Gemm's C is shared with another node"
        elif c.size in (1, n) and c.ndim <= 2 and (c.ndim < 2 or c.shape[0] == 1):
            bias = beta * np.broadcast_to(c.reshape(-1).astype(np.float64), (n,))
            absorbed.append(c_name)
        else:
            return "Gemm's C varies per row: it is not a bias"
    layer = Layer(matrix.astype(weight.dtype), None if bias is None else bias.astype(weight.dtype))
    return LayerTarget(node_name(node), "Gemm", node, layer, weight.dtype,
                       index.shape(node.input[0]), gemm_c=gemm_c, absorbed=absorbed)


def _matmul(index: GraphIndex, node: onnx.NodeProto) -> LayerTarget | str:
    a_const, b_const = index.is_constant(node.input[0]), index.is_constant(node.input[1])
    if a_const and b_const:
        return "both inputs are constant (a job for constant folding)"
    if not a_const and not b_const:
        return "no constant weight: both inputs are computed at run time"
    side = "right" if b_const else "left"
    w_name, x_name = (node.input[1], node.input[0]) if b_const else (node.input[0], node.input[1])
    weight = _weight(index, w_name, x_name)
    if isinstance(weight, str):
        return weight
    if weight.ndim != 2:
        return f"weight has {weight.ndim} dims: only 2-D MatMul weights are factored"
    matrix = weight.T if side == "right" else weight  # (out, in)
    target = LayerTarget(node_name(node), "MatMul", node, Layer(matrix), weight.dtype,
                         index.shape(x_name), weight_side=side, absorbed=[w_name])
    if side == "right":
        _take_bias_add(index, target)
    return target


def _take_bias_add(index: GraphIndex, target: LayerTarget) -> None:
    """MatMul followed by Add of a (N,) constant is one dense layer (Keras/TF exports)."""
    out = target.node.output[0]
    users = index.consumers.get(out, [])
    if index.uses(out) != 1 or len(users) != 1 or users[0].op_type != "Add":
        return
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    value = index.constant(other)
    n = target.layer.out_channels
    if value is None or index.uses(other) != 1 or value.size != n or value.shape[-1:] != (n,):
        return
    target.layer = Layer(target.layer.weight, value.reshape(n))
    target.bias_add = add
    target.absorbed.append(other)
