"""Pieces of a graph cut at its tensors: a copy that also outputs inner tensors (to read them in
one run), and the part of a graph downstream of a node, fed at its frontier (to rerun only what a
change to that node can affect)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .index import subgraph_inputs


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (typed as inferred; float when inference did
    not reach them), the trick of onnxruntime's MinMaxCalibrater.augment_graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    infos = {vi.name: vi for vi in model.graph.value_info}
    present = {o.name for o in model.graph.output}
    for n in names:
        if n not in present:
            out.graph.output.append(infos[n] if n in infos else
                                    helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return out


@dataclass
class Downstream:
    nodes: list[int]     # indices of the nodes that depend on the start node, itself included
    frontier: list[str]  # what they read that the rest of the graph or its inputs give
    outputs: list[str]   # the graph outputs they compute (the others cannot change)


def downstream(graph: onnx.GraphProto, start: onnx.NodeProto) -> Downstream:
    """What depends on `start`, by one pass in graph (topological) order."""
    constants = {t.name for t in graph.initializer}
    tainted: set[str] = set()
    nodes: list[int] = []
    frontier: dict[str, None] = {}
    for i, node in enumerate(graph.node):
        reads = [n for n in node.input if n] + sorted(subgraph_inputs(node))
        if (node.output and node.output[0] == start.output[0]) or any(n in tainted for n in reads):
            nodes.append(i)
            tainted.update(node.output)
            frontier.update((n, None) for n in reads if n not in tainted and n not in constants)
    outputs = [o.name for o in graph.output if o.name in tainted]
    return Downstream(nodes, list(frontier), outputs)


def downstream_model(model: onnx.ModelProto, part: Downstream, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model of `part`'s nodes alone: its frontier becomes the inputs (typed from `feeds`,
    values of them), its outputs those of the whole graph it computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keep = [graph.node[i] for i in part.nodes]
    read = {n for node in keep for n in list(node.input) + sorted(subgraph_inputs(node))}
    inits = [t for t in graph.initializer if t.name in read]
    outputs = [o for o in graph.output if o.name in part.outputs]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype),
                                            [None] * feeds[n].ndim) for n in part.frontier]
    del graph.node[:], graph.initializer[:], graph.input[:], graph.output[:], graph.value_info[:]
    graph.node.extend(keep)
    graph.initializer.extend(inits)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    return out
