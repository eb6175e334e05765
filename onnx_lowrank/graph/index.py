"""Look-ups over one ONNX graph: constants (initializers and Constant nodes), producers,
consumers (subgraphs included), graph inputs/outputs and inferred shapes."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}
# what counts as a model's parameters: weights, also quantized ones (8- and 4-bit integers)
WEIGHT_TYPES = FLOAT_TYPES | {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                              onnx.TensorProto.UINT4}


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(subgraph_inputs(inner) - local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def opset_version(model: onnx.ModelProto) -> int | None:
    """The version of the default (ai.onnx) opset the model imports; None if it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def shape_of(value_info: onnx.ValueInfoProto) -> tuple | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in t.tensor_type.shape.dim)


class UniqueNames:
    """New tensor and node names, none already in use (`used`: GraphIndex.names())."""

    def __init__(self, used: set[str]):
        self.used = used

    def new(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


class GraphIndex:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.subgraph_uses: Counter[str] = Counter()
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            self.subgraph_uses.update(subgraph_inputs(node))
        self.shapes: dict[str, tuple | None] = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            self.shapes[vi.name] = shape_of(vi)
        for t in graph.initializer:
            self.shapes.setdefault(t.name, tuple(t.dims))

    def is_constant(self, name: str) -> bool:
        return (name in self.initializers and name not in self.graph_inputs) or name in self.constant_nodes

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is a constant the graph cannot be fed at run time."""
        if name in self.initializers and name not in self.graph_inputs:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            return constant_node_value(self.constant_nodes[name])
        return None

    def uses(self, name: str) -> int:
        """How many places read `name`: nodes, subgraphs, graph outputs."""
        return len(self.consumers.get(name, ())) + self.subgraph_uses[name] + (name in self.graph_outputs)

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shape(name)
        if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
            return None
        return shape

    def names(self) -> set[str]:
        """Every tensor and node name in use, to keep new names unique."""
        used = set(self.initializers) | self.graph_inputs | self.graph_outputs | set(self.producer)
        used.update(n.name for n in self.graph.node if n.name)
        used.update(self.consumers)
        return used
