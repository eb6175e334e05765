"""Replace targets by the node chains of their factors. The chain takes over the target's input
and its original output name; new names derive from the node's name; the weights go back in
the original dtype; the IR version is one onnxruntime accepts; shapes are inferred again so the
result passes the full onnx.checker."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..decompositions.base import ConvStep, DenseStep, Factors, FoldChannels, UnfoldChannels
from .index import GraphIndex, opset_version
from .prepare import infer_shapes
from .targets import LayerTarget


def chain_prefix(target: LayerTarget) -> str:
    return f"{target.name}/lowrank"


class _Names:
    def __init__(self, used: set[str]):
        self.used = used

    def new(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def build_chain(target: LayerTarget, factors: Factors, names: _Names, opset: int
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that compute `target` with `factors`."""
    steps = factors.chain()
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prefix = chain_prefix(target)
    x_name = target.node.input[1] if target.weight_side == "left" else target.node.input[0]
    current = x_name
    channels = target.layer.in_per_group * target.layer.groups
    last = len(steps) - 1

    def const(base: str, value: np.ndarray, dtype=None) -> str:
        name = names.new(base)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype or target.dtype)), name))
        return name

    for i, step in enumerate(steps):
        base = f"{prefix}/{i}"
        # the final output keeps the target's name unless a bias Add still follows
        is_last = i == last and not (isinstance(step, DenseStep) and step.bias is not None
                                     and target.op_type == "MatMul")
        out = target.output if is_last else names.new(f"{base}/out")
        if isinstance(step, ConvStep):
            inputs = [current, const(f"{base}/W", step.weight)]
            if step.bias is not None:
                inputs.append(const(f"{base}/B", step.bias))
            g = step.geometry
            attrs = dict(kernel_shape=list(step.weight.shape[2:]), strides=list(g.strides),
                         dilations=list(g.dilations), group=step.group)
            if g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                attrs["auto_pad"] = g.auto_pad
            else:
                attrs["pads"] = list(g.pads)
            nodes.append(helper.make_node("Conv", inputs, [out], name=names.new(f"{base}/Conv"), **attrs))
            channels = step.weight.shape[0]
        elif isinstance(step, (FoldChannels, UnfoldChannels)):
            ndim = target.layer.geometry.ndim
            if isinstance(step, FoldChannels):
                channels //= step.outer
            else:
                channels *= step.outer
            # 0 copies the input's spatial size, so any H, W and batch size work
            shape = const(f"{base}/shape", np.array([-1, channels] + [0] * ndim), np.int64)
            nodes.append(helper.make_node("Reshape", [current, shape], [out], name=names.new(f"{base}/Reshape")))
        elif isinstance(step, DenseStep):
            nodes += _dense_nodes(target, step, i == last, current, out, base, const, names, opset)
        else:
            raise TypeError(f"unknown chain step {step!r}")
        current = out
    return nodes, inits


def _dense_nodes(target: LayerTarget, step: DenseStep, is_last: bool, current: str, out: str,
                 base: str, const, names: _Names, opset: int) -> list[onnx.NodeProto]:
    if target.op_type == "Gemm":
        attrs = dict(transB=1)
        if current == target.node.input[0]:
            trans_a = next((a.i for a in target.node.attribute if a.name == "transA"), 0)
            attrs["transA"] = trans_a
        inputs = [current, const(f"{base}/W", step.weight)]
        if is_last and step.bias is not None:
            inputs.append(const(f"{base}/C", step.bias))
        elif is_last and target.gemm_c is not None:
            inputs.append(target.gemm_c[0])
            attrs["beta"] = target.gemm_c[1]
        elif opset < 11:  # Gemm's C is optional from opset 11 on
            inputs.append(const(f"{base}/C", np.zeros(len(step.weight))))
        return [helper.make_node("Gemm", inputs, [out], name=names.new(f"{base}/Gemm"), **attrs)]
    # MatMul: X @ W^T on the right, W @ X on the left
    if target.weight_side == "right":
        inputs = [current, const(f"{base}/W", step.weight.T)]
    else:
        inputs = [const(f"{base}/W", step.weight), current]
    nodes = [helper.make_node("MatMul", inputs, [out], name=names.new(f"{base}/MatMul"))]
    if step.bias is not None:
        nodes.append(helper.make_node("Add", [out, const(f"{base}/bias", step.bias)], [target.output],
                                      name=names.new(f"{base}/Add")))
    return nodes


def replace_layers(model: onnx.ModelProto, chosen: Iterable[tuple[LayerTarget, Factors]],
                   infer: bool = True, copy: bool = True) -> onnx.ModelProto:
    """A copy of `model` (the prepared model the targets were found in) with each target
    replaced by its factors' chain. `infer=False` leaves out shape inference: onnxruntime runs
    the model without it, and a search builds many models it only runs. `copy=False` rewrites
    `model` itself, for a model made only to be rewritten (a second copy of VGG-16 is 550 MB)."""
    chosen = list(chosen)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)
    names = _Names(index.names())
    opset = opset_version(out) or 1
    by_output = {t.node.output[0]: (t, f) for t, f in chosen}
    dropped = {t.bias_add.output[0] for t, _ in chosen if t.bias_add is not None}

    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.output and node.output[0] in dropped:
            continue
        hit = by_output.get(node.output[0]) if node.output else None
        if hit is None:
            new_nodes.append(node)
            continue
        nodes, inits = build_chain(hit[0], hit[1], names, opset)
        new_nodes.extend(nodes)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(new_nodes)

    _drop_if_unused(graph, [name for t, _ in chosen for name in t.absorbed])
    set_ir_version(out)
    # value_info of the replaced tensors is stale; infer everything afresh
    del out.graph.value_info[:]
    return infer_shapes(out) if infer else out


def _drop_if_unused(graph: onnx.GraphProto, names: list[str]) -> None:
    index = GraphIndex(graph)
    gone = {n for n in names if index.uses(n) == 0 and n not in index.graph_inputs}
    for t in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(t)
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in gone]:
        graph.node.remove(n)


@lru_cache(maxsize=1)
def max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (onnx may write a newer one)."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for version in range(onnx.IR_VERSION, 3, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=version)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return version
        except Exception:  # noqa: BLE001 - onnxruntime raises its own types; any failure means "not this one"
            continue
    return 7


def set_ir_version(model: onnx.ModelProto) -> None:
    model.ir_version = min(model.ir_version, max_ir_version())
