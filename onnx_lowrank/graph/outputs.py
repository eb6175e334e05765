"""Which axis of each graph output holds its channels, and which channels one layer wrote: read
from the graph, for the r2 metric (metrics/quality.py), which measures every channel on its own
scale.

A Conv writes its channels on axis 1, a MatMul on the last axis: a transformer's (samples, tokens,
features) or a channels-last (samples, H, W, maps) output, read with axis 1 as the channel, makes
a channel of each token or row. The walk goes back from the output through ops that keep each
element's channel (elementwise ops, normalizations, Transpose, which moves it) to the layer that
wrote it; a Concat along the channel axis joins the channels of several. Where the walk meets
anything else (a Reshape that is more than a squeeze, a Gather, a Split), nothing is known: axis 1,
each channel alone."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import InvalidModel
from .index import GraphIndex, node_attrs
from .prepare import infer_shapes

# ops whose output element (…, c, …) is computed from input elements of the same channel c, on
# an output of the same rank (the constant operand of a binary op broadcasts)
KEEP_CHANNEL = {
    "Abs", "Add", "BatchNormalization", "Cast", "Celu", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu",
    "Log", "LogSoftmax", "Mish", "Mul", "Neg", "PRelu", "Pow", "Reciprocal", "Relu", "Selu", "Sigmoid",
    "Softmax", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
}


@dataclass(frozen=True)
class Layout:
    """`axis`: the output's channel axis; None: the output is one channel (a one-channel map
    with that axis dropped). `layers`: (start, stop) spans of the channels along it that one layer
    wrote, in order and covering them all; None where the writers are not known. `rank`: the
    output's, which the outputs measured must have for the layout to apply."""
    axis: int | None
    layers: tuple[tuple[int, int], ...] | None
    rank: int = 0


def output_layouts(model: onnx.ModelProto) -> list[Layout | None]:
    """Per graph output, its Layout; None where the walk does not reach a writing layer (the
    metric then takes axis 1, each channel alone)."""
    try:
        model = infer_shapes(model)
    except InvalidModel:
        return [None] * len(model.graph.output)
    index = GraphIndex(model.graph)
    ranks = [len(o.type.tensor_type.shape.dim) for o in model.graph.output]
    walked = [_walk(index, o.name, rank, 0) if rank else None for o, rank in zip(model.graph.output, ranks)]
    return [None if w is None else Layout(w.axis, w.layers, rank) for w, rank in zip(walked, ranks)]


def _walk(index: GraphIndex, name: str, rank: int, depth: int) -> Layout | None:
    """`rank`: the tensor's rank, known where inference lost its shape (a Paddle export's dynamic
    dimensions), since every op followed keeps it or says what it was."""
    node = index.producer.get(name)
    if node is None or depth > 200:
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        axis = rank - 1 if op == "MatMul" else 1
        channels = _written(index, node, axis)
        return Layout(axis, ((0, channels),)) if channels else None
    if op == "Transpose":
        inner = _walk(index, node.input[0], rank, depth + 1)
        perm = list(node_attrs(node).get("perm", range(rank - 1, -1, -1)))
        return None if inner is None or inner.axis is None else Layout(perm.index(inner.axis), inner.layers)
    if op in ("Reshape", "Squeeze", "Unsqueeze"):
        return _squeeze(index, node, name, depth)
    if op == "Concat":
        return _concat(index, node, rank, depth)
    if op in KEEP_CHANNEL:
        fed = [i for i in node.input if i and not index.is_constant(i)
               and (index.shape(i) is None or len(index.shape(i)) == rank)]
        return _walk(index, fed[0], rank, depth + 1) if fed else None
    return None


def _written(index: GraphIndex, node: onnx.NodeProto, axis: int) -> int | None:
    """How many channels a layer writes: its weight's, else its output's inferred shape's."""
    weight = index.shape(node.input[1]) if len(node.input) > 1 else None
    attrs = node_attrs(node)
    if weight is not None and all(isinstance(d, int) for d in weight):
        if node.op_type == "Conv":
            return weight[0]
        if node.op_type == "ConvTranspose":
            return weight[1] * attrs.get("group", 1)
        if node.op_type == "Gemm":
            return weight[0] if attrs.get("transB", 0) else weight[1]
        return weight[-1]
    shape = index.shape(node.output[0])
    channels = shape[axis] if shape is not None and len(shape) > axis else None
    return channels if isinstance(channels, int) and channels > 0 else None


def _squeeze(index: GraphIndex, node: onnx.NodeProto, name: str, depth: int) -> Layout | None:
    """A Reshape, Squeeze or Unsqueeze that only drops or adds axes of size 1 (a one-channel
    map (N, 1, T, F) written as (N, T, F)) moves the channel axis; where it drops the channel axis
    itself, the output is that one channel (axis None). Any other reshape is not followed."""
    before, after = index.shape(node.input[0]), index.shape(name)
    if before is None or after is None or any(d is None for d in before + after):
        return None
    if before[0] != after[0] and not (isinstance(before[0], str) and isinstance(after[0], str)):
        return None  # (a free batch size may be named differently on each side)
    kept = [i for i, d in enumerate(before) if i and d != 1]  # past the samples axis
    placed = [i for i, d in enumerate(after) if i and d != 1]
    if [before[i] for i in kept] != [after[i] for i in placed]:
        return None
    inner = _walk(index, node.input[0], len(before), depth + 1)
    if inner is None or inner.axis is None or before[inner.axis] == 1:
        return None if inner is None else Layout(None, None)
    return Layout(placed[kept.index(inner.axis)], inner.layers)


def _concat(index: GraphIndex, node: onnx.NodeProto, rank: int, depth: int) -> Layout | None:
    """Along the channel axis, the inputs' layers one after another; along another axis (a
    detector's scales side by side), the inputs' common layout."""
    axis = node_attrs(node).get("axis", 0) % rank
    parts = [_walk(index, i, rank, depth + 1) for i in node.input]
    if any(p is None or p.axis is None for p in parts) or len({p.axis for p in parts}) != 1:
        return None
    if parts[0].axis != axis:
        return parts[0] if all(p.layers == parts[0].layers for p in parts) else Layout(parts[0].axis, None)
    layers, offset = [], 0
    for p in parts:
        if p.layers is None:
            return Layout(axis, None)
        layers += [(offset + a, offset + b) for a, b in p.layers]
        offset += p.layers[-1][1]
    return Layout(axis, tuple(layers))
