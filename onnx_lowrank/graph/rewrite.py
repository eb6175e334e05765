"""Replace targets by the node chains of their factors. The chain takes over the target's input
and its original output name; new names derive from the node's name; the weights go back in
the original dtype; the IR version is one onnxruntime accepts; shapes are inferred again so the
result passes the full onnx.checker. The rewrite says what it wrote (`Chain`, per target), so
that compensation, quantization and the report read it rather than search the graph for it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..decompositions.base import ConvStep, DenseStep, Factors, FoldChannels, Layer, UnfoldChannels
from .index import GraphIndex, UniqueNames, opset_version
from .prepare import infer_shapes
from .targets import LayerTarget


@dataclass(frozen=True)
class LastStep:
    """A chain's last linear step, Y = Z W^T + b over the rows of its input Z: what compensation
    refits."""

    node: str           # its node's name
    input: str          # the tensor it reads (Z)
    weight: str         # the initializer holding W
    transposed: bool    # W stored as (in, out): a MatMul's X @ W
    bias: str | None    # the initializer of b (Conv's B, Gemm's C at beta 1, the Add's constant); None: no bias
    layer: Layer        # the step as a layer: W as (out, in/group, *kernel), its conv geometry and groups


@dataclass(frozen=True)
class Chain:
    """What the rewrite wrote for one target: its nodes in order, and its last step (None where
    the chain ends in a Reshape: a ring's)."""

    nodes: tuple[str, ...]
    last: LastStep | None


@dataclass
class Rewritten:
    model: onnx.ModelProto
    chains: dict[str, Chain]  # per target name


def chain_prefix(target: LayerTarget) -> str:
    return f"{target.name}/lowrank"


def build_chain(target: LayerTarget, factors: Factors, names: UniqueNames, opset: int
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], Chain]:
    """The nodes and initializers that compute `target` with `factors`, and what they are."""
    steps = factors.chain()
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prefix = chain_prefix(target)
    x_name = target.node.input[1] if target.weight_side == "left" else target.node.input[0]
    current = x_name
    channels = target.layer.in_per_group * target.layer.groups
    last = len(steps) - 1
    last_step = None

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
            last_step = LastStep(nodes[-1].name, current, inputs[1], False, inputs[2] if len(inputs) > 2 else None,
                                 Layer(step.weight, None, g, step.group))
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
            written, last_step = _dense_nodes(target, step, i == last, current, out, base, const, names, opset)
            nodes += written
        else:
            raise TypeError(f"unknown chain step {step!r}")
        if isinstance(step, (FoldChannels, UnfoldChannels)):
            last_step = None
        current = out
    return nodes, inits, Chain(tuple(n.name for n in nodes), last_step)


def _dense_nodes(target: LayerTarget, step: DenseStep, is_last: bool, current: str, out: str,
                 base: str, const, names: UniqueNames, opset: int) -> tuple[list[onnx.NodeProto], LastStep]:
    if target.op_type == "Gemm":
        attrs = dict(transB=1)
        if current == target.node.input[0]:
            trans_a = next((a.i for a in target.node.attribute if a.name == "transA"), 0)
            attrs["transA"] = trans_a
        inputs = [current, const(f"{base}/W", step.weight)]
        bias = None
        if is_last and step.bias is not None:
            inputs.append(bias := const(f"{base}/C", step.bias))
        elif is_last and target.gemm_c is not None:
            inputs.append(target.gemm_c[0])
            attrs["beta"] = target.gemm_c[1]
            bias = target.gemm_c[0] if target.gemm_c[1] == 1.0 else None
        elif opset < 11:  # Gemm's C is optional from opset 11 on
            inputs.append(bias := const(f"{base}/C", np.zeros(len(step.weight))))
        node = helper.make_node("Gemm", inputs, [out], name=names.new(f"{base}/Gemm"), **attrs)
        return [node], LastStep(node.name, current, inputs[1], False, bias, Layer(step.weight))
    # MatMul: X @ W^T on the right, W @ X on the left
    if target.weight_side == "right":
        inputs = [current, const(f"{base}/W", step.weight.T)]
    else:
        inputs = [const(f"{base}/W", step.weight), current]
    nodes = [helper.make_node("MatMul", inputs, [out], name=names.new(f"{base}/MatMul"))]
    bias = None
    if step.bias is not None:
        nodes.append(helper.make_node("Add", [out, bias := const(f"{base}/bias", step.bias)], [target.output],
                                      name=names.new(f"{base}/Add")))
    weight = inputs[1] if target.weight_side == "right" else inputs[0]
    return nodes, LastStep(nodes[0].name, current, weight, target.weight_side == "right", bias, Layer(step.weight))


def replace_layers(model: onnx.ModelProto, chosen: Iterable[tuple[LayerTarget, Factors]],
                   infer: bool = True, copy: bool = True) -> Rewritten:
    """A copy of `model` (the prepared model the targets were found in) with each target
    replaced by its factors' chain, and the chains. `infer=False` leaves out shape inference: onnxruntime runs
    the model without it, and a search builds many models it only runs. `copy=False` rewrites
    `model` itself, for a model made only to be rewritten (a second copy of VGG-16 is 550 MB)."""
    chosen = list(chosen)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)
    names = UniqueNames(index.names())
    opset = opset_version(out) or 1
    by_output = {t.node.output[0]: (t, f) for t, f in chosen}
    dropped = {t.bias_add.output[0] for t, _ in chosen if t.bias_add is not None}

    new_nodes: list[onnx.NodeProto] = []
    chains: dict[str, Chain] = {}
    for node in graph.node:
        if node.output and node.output[0] in dropped:
            continue
        hit = by_output.get(node.output[0]) if node.output else None
        if hit is None:
            new_nodes.append(node)
            continue
        nodes, inits, chains[hit[0].name] = build_chain(hit[0], hit[1], names, opset)
        new_nodes.extend(nodes)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(new_nodes)

    _drop_if_unused(graph, [name for t, _ in chosen for name in t.absorbed])
    set_ir_version(out)
    # value_info of the replaced tensors is stale; infer everything afresh
    del out.graph.value_info[:]
    return Rewritten(infer_shapes(out) if infer else out, chains)


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
