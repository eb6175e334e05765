"""Prepare a model for decomposition: give each Identity of a constant its own copy, infer shapes,
and fold BatchNormalization and constant Mul/Add that follow a Conv or Gemm into its weight and
bias, so the decomposition sees the weights the layer really applies. The input model is not
modified."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidModel, first_line
from .index import GraphIndex, node_attrs
from .io import weights_apart


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference (with data propagation) on the model without its large weights,
    which inference reads only the dims of; they are put back afterwards."""
    light, names, _ = weights_apart(model, values=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise InvalidModel(f"shape inference failed: {first_line(e)}") from None
    if names:
        apart = set(names)
        weights = {t.name: t for t in model.graph.initializer if t.name in apart}
        for t in inferred.graph.initializer:
            if t.name in weights:
                t.CopyFrom(weights[t.name])
    return inferred


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    constant_identities(prepared.graph)
    prepared = infer_shapes(prepared)
    while fold_once(prepared.graph):
        pass
    return infer_shapes(prepared)


def constant_identities(graph: onnx.GraphProto) -> None:
    """Identity nodes of a constant become constants of their own. PyTorch's exporter writes
    each set of equal weights once and the others as Identity of it (every LayerNorm's ones,
    equal projections): so each layer owns its weight again, and can be factored or trained on
    its own (onnx2torch takes a LayerNorm scale only from an initializer)."""
    index = GraphIndex(graph)
    for node in list(graph.node):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or node.output[0] in index.graph_outputs:
            continue
        value = index.constant(node.input[0])
        if value is None:
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        graph.node.remove(node)


def per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`value` as a (channels,) vector when, broadcast against a tensor of `rank` dims whose axis 1
    holds the channels, it varies along that axis only; else None."""
    if value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)


class _Layer:
    """A Conv or Gemm whose weight (and bias) can be rewritten in place."""

    def __init__(self, index: GraphIndex, node: onnx.NodeProto):
        self.index, self.node = index, node
        self.attrs = node_attrs(node)

    @classmethod
    def find(cls, index: GraphIndex, tensor: str) -> "_Layer | None":
        node = index.producer.get(tensor)
        if node is None or node.op_type not in ("Conv", "Gemm") or index.uses(tensor) != 1:
            return None
        layer = cls(index, node)
        weight = node.input[1]
        if index.uses(weight) != 1 or layer.weight() is None or layer.bias() is False:
            return None
        return layer

    @property
    def channels(self) -> int:
        w = self.weight()
        if self.node.op_type == "Conv":
            return w.shape[0]
        return w.shape[0] if self.attrs.get("transB", 0) else w.shape[1]

    @property
    def out_rank(self) -> int:
        return self.weight().ndim if self.node.op_type == "Conv" else 2

    def weight(self) -> np.ndarray | None:
        return self.index.constant(self.node.input[1])

    def bias(self) -> np.ndarray | None | bool:
        """The bias as it acts on the output, a (channels,) vector (for Gemm, beta * C); None
        when absent; False when it cannot be folded into (not a constant, shared, per-row)."""
        if len(self.node.input) < 3 or not self.node.input[2]:
            return None
        name = self.node.input[2]
        value = self.index.constant(name)
        if value is None or self.index.uses(name) != 1:
            return False
        if self.node.op_type == "Conv":  # Conv's B is always (channels,)
            return value.astype(np.float64)
        vec = per_channel(value, self.channels, 2)
        return False if vec is None else vec * self.attrs.get("beta", 1.0)

    def scale_output(self, scale: np.ndarray) -> None:
        w = self.weight().astype(np.float64)
        if self.node.op_type == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif self.attrs.get("transB", 0):
            w = w * scale[:, None]
        else:
            w = w * scale[None, :]
        self._set(1, w, "weight")

    def set_bias(self, bias: np.ndarray) -> None:
        if self.node.op_type == "Gemm":
            # the new C is a (channels,) vector: it is multiplied by beta, which we just made 1
            for a in self.node.attribute:
                if a.name == "beta":
                    a.f = 1.0
        self._set(2, bias, "bias")

    def _set(self, position: int, value: np.ndarray, kind: str) -> None:
        names = self.index.names()
        base = f"{self.node.name or self.node.output[0]}_folded_{kind}"
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        tensor = numpy_helper.from_array(value.astype(self.weight().dtype), name)
        self.index.graph.initializer.append(tensor)
        self.index.initializers[name] = tensor
        while len(self.node.input) <= position:
            self.node.input.append("")
        self.node.input[position] = name


def fold_once(graph: onnx.GraphProto) -> bool:
    """Fold one BatchNormalization / Mul / Add into the Conv or Gemm before it. True if it did."""
    index = GraphIndex(graph)
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            if any(node.output[1:]):
                continue  # training-mode outputs (running mean/var) are read: leave it
            layer = _Layer.find(index, node.input[0])
            params = [index.constant(n) for n in node.input[1:5]]
            if layer is None or any(p is None for p in params):
                continue
            if any(p.shape != (layer.channels,) for p in params):
                continue
            scale, shift, mean, var = (p.astype(np.float64) for p in params)
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            s = scale / np.sqrt(var + eps)
            bias = layer.bias()
            bias = np.zeros(layer.channels) if bias is None else bias
            layer.scale_output(s)
            layer.set_bias((bias - mean) * s + shift)
        elif node.op_type in ("Mul", "Add"):
            found = None
            for mine, other in ((0, 1), (1, 0)):
                layer = _Layer.find(index, node.input[mine])
                value = index.constant(node.input[other])
                if layer is not None and value is not None:
                    vec = per_channel(value, layer.channels, layer.out_rank)
                    if vec is not None:
                        found = (layer, vec)
                        break
            if found is None:
                continue
            layer, vec = found
            bias = layer.bias()
            if node.op_type == "Mul":
                layer.scale_output(vec)
                if bias is not None:
                    layer.set_bias(bias * vec)
            else:
                layer.set_bias((np.zeros(layer.channels) if bias is None else bias) + vec)
        else:
            continue
        # the layer now computes the folded node's output: take its name and drop the node
        layer.node.output[0] = node.output[0]
        graph.node.remove(node)
        drop_unused(graph)
        return True
    return False


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and Constant nodes nothing reads any more (the pre-fold weights)."""
    index = GraphIndex(graph)
    for t in list(graph.initializer):
        if index.uses(t.name) == 0 and t.name not in index.graph_inputs:
            graph.initializer.remove(t)
    for n in list(graph.node):
        if n.op_type == "Constant" and index.uses(n.output[0]) == 0:
            graph.node.remove(n)
