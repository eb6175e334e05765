"""Pieces of a graph cut at its tensors: a copy that also outputs inner tensors (to read them in
one run), and the part of a graph downstream of a node, fed at its frontier (to rerun only what a
change to that node can affect)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .index import constant_node_value, subgraph_inputs


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names`, the trick of onnxruntime's
    MinMaxCalibrater.augment_graph. Typed as inferred; where inference did not reach a tensor
    (paddle2onnx graphs), untyped: onnxruntime takes the type it computes, where a guess (float)
    would fail the session on a shape tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    infos = {vi.name: vi for vi in model.graph.value_info}
    present = {o.name for o in model.graph.output}
    for n in names:
        if n not in present:
            out.graph.output.append(infos[n] if n in infos else onnx.ValueInfoProto(name=n))
    return out


@dataclass
class Downstream:
    nodes: list[int]     # indices of the nodes to run: those that depend on the start node, itself
    #                      included, and the input-independent ones they read (Constant nodes, ...)
    frontier: list[str]  # what they read that the rest of the graph or its inputs give
    outputs: list[str]   # the graph outputs they compute (the others cannot change)


# ops whose output is not a function of their inputs alone
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                  onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}
# ops that carry shapes and indices through when their inputs are integers
_SHAPE_OPS = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Add", "Sub", "Mul", "Div", "Floor", "Ceil",
              "Max", "Min", "Reshape", "Expand", "Tile", "Range", "ReduceProd", "Identity", "Equal", "Where",
              "Not", "Less", "Greater", "Abs", "Neg", "Mod", "ConstantOfShape", "Transpose"}


def _integer_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors that hold shapes, indices or masks rather than data: typed so by shape inference,
    or produced by Shape/Size, or by index arithmetic on such tensors (where inference gave up)."""
    integer = {vi.name for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
               if vi.type.tensor_type.elem_type in _INTEGER_TYPES}
    integer |= {t.name for t in graph.initializer if t.data_type in _INTEGER_TYPES}
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin"):
            integer.update(node.output)
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in _INTEGER_TYPES:
                integer.update(node.output)
        elif node.op_type == "Constant":
            value = constant_node_value(node)
            if value is not None and not np.issubdtype(value.dtype, np.floating):
                integer.update(node.output)
        elif node.op_type in _SHAPE_OPS and inputs and all(n in integer for n in inputs[:1]):
            integer.update(node.output)
    return integer


def downstream(graph: onnx.GraphProto, start: onnx.NodeProto) -> Downstream:
    """What depends on `start`, by one pass in graph (topological) order, and what those nodes
    need to run alone. Shapes and indices they read are computed inside the part from what they
    are computed of, not fed at its frontier: fed as inputs, their values are unknown when
    onnxruntime builds the session, and its shape inference of a Resize whose sizes are
    Concat(Slice(Shape(x), starts, ends), Cast(...)) fails ("Number of elements of input 'sizes'
    (0) must be same as rank of input 'X'"). Tensors that depend on no input at all (a Constant
    node's) are computed inside the part for the same reason."""
    initializers = {t.name for t in graph.initializer}
    constant_tensors = set(initializers)
    integer = _integer_tensors(graph)
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    tainted: set[str] = set()
    nodes: set[int] = set()

    # what each node reads, subgraphs included, once
    reads = [[n for n in node.input if n] + sorted(subgraph_inputs(node)) for node in graph.node]
    for i, node in enumerate(graph.node):
        if all(n in constant_tensors for n in reads[i]) and node.op_type not in _NONDETERMINISTIC:
            constant_tensors.update(node.output)
        elif (node.output and node.output[0] == start.output[0]) or any(n in tainted for n in reads[i]):
            nodes.add(i)
            tainted.update(node.output)
    # pull in the producers of what the part reads that is constant or a shape, back to data tensors
    needed = [n for i in nodes for n in reads[i]]
    while needed:
        name = needed.pop()
        i = producer.get(name)
        if i is None or i in nodes or not (name in constant_tensors or name in integer):
            continue
        nodes.add(i)
        needed.extend(reads[i])
    made = {o for i in nodes for o in graph.node[i].output}
    frontier = dict.fromkeys(n for i in sorted(nodes) for n in reads[i] if n not in made and n not in initializers)
    outputs = [o.name for o in graph.output if o.name in tainted]
    return Downstream(sorted(nodes), list(frontier), outputs)


def downstream_model(model: onnx.ModelProto, part: Downstream, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model of `part`'s nodes alone: its frontier becomes the inputs (typed from `feeds`,
    values of them), its outputs `part.outputs` (typed where they are the graph's)."""
    # built up, not copied and pruned: a copy of a VGG-16 would be 550 MB of weights per layer probed
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                          producer_version=model.producer_version, domain=model.domain)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    keep = [model.graph.node[i] for i in part.nodes]
    read = {n for node in keep for n in list(node.input) + sorted(subgraph_inputs(node))}
    graph = out.graph
    graph.name = model.graph.name
    graph.node.extend(keep)
    graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
    graph.input.extend(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype),
                                                     [None] * feeds[n].ndim) for n in part.frontier)
    typed = {o.name: o for o in model.graph.output}  # an inner tensor's type onnxruntime infers
    graph.output.extend(typed.get(n, onnx.ValueInfoProto(name=n)) for n in part.outputs)
    return out


def pieces(graph: onnx.GraphProto, outputs: list[str]) -> list[Downstream]:
    """The graph cut into pieces that compute `outputs` in turn, for a caller that changes weights
    between them (compensation/refit.py): each piece computes its output back to the graph inputs and to
    what earlier pieces computed (fed at its frontier), and outputs, after its own, what later
    pieces start from. Shapes and indices are computed again inside each piece that reads them:
    fed at a frontier, they are unknown when onnxruntime builds the session (downstream)."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    initializers = {t.name for t in graph.initializer}
    integer = _integer_tensors(graph)
    found: list[Downstream] = []
    computed: set[str] = set()  # data tensors an earlier piece computed
    for output in outputs:
        nodes: set[int] = set()
        frontier: dict[str, None] = {}
        needed = [output]
        while needed:
            name = needed.pop()
            if not name or name in initializers:
                continue
            i = producer.get(name)
            if name in computed or i is None:
                frontier[name] = None
            elif i not in nodes:
                nodes.add(i)
                node = graph.node[i]
                needed.extend([n for n in node.input if n] + sorted(subgraph_inputs(node)))
        found.append(Downstream(sorted(nodes), list(frontier), [output]))
        computed.update(o for i in nodes for o in graph.node[i].output if o not in integer)
    last_use = {n: k for k, piece in enumerate(found) for n in piece.frontier}
    for k, piece in enumerate(found):
        made = [o for i in piece.nodes for o in graph.node[i].output]
        piece.outputs += [n for n in made if last_use.get(n, -1) > k and n != piece.outputs[0]]
    return found
