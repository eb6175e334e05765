"""ONNX → torch.nn.Module through onnx2torch, and the way back from an ONNX node name to the
torch parameter holding its weight.

onnx2torch converts up to about opset 17 and leaves out a few attribute values; it fails loudly
(NotImplementedError) rather than silently wrong. `prepare_for_onnx2torch` rewrites a copy of the
model into the form it takes, without changing what the model computes."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxLowrankError, first_line
from ..graph.index import GraphIndex, constant_node_value, node_attrs, opset_version
from ..graph.prepare import infer_shapes
from ..graph.targets import TARGET_OPS, node_name
from . import deps

if TYPE_CHECKING:
    import torch

MAX_OPSET = 17  # the newest opset onnx2torch has converters for (AveragePool-19, Pad-18 … are missing)
ONNX_DOMAINS = ("", "ai.onnx")


def to_torch(model: onnx.ModelProto) -> torch.nn.Module:
    """The model as a torch.fx.GraphModule in eval mode, taking the graph inputs positionally
    (initializers excluded) in graph order. Every weight of a Conv, Gemm or MatMul is an
    nn.Parameter, so it trains. The input model is not modified."""
    deps.require_torch()
    import onnx2torch

    prepared = prepare_for_onnx2torch(model)
    if deps.torchvision_stubbed:
        used = sorted({n.op_type for n in prepared.graph.node} & set(deps.TORCHVISION_OPS))
        if used:
            raise OnnxLowrankError(f"the model uses {', '.join(used)}, which onnx2torch runs through "
                                   "torchvision; torchvision is not installed")
    try:
        # attach_onnx_mapping records each module's ONNX input/output names: layer_weights uses it
        module = onnx2torch.convert(prepared, attach_onnx_mapping=True)
    except NotImplementedError as e:
        raise OnnxLowrankError(f"onnx2torch cannot convert this model: {e}") from None
    _constant_weights_to_parameters(module)
    return module.eval()


def prepare_for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` that onnx2torch converts and that computes the same thing: opset lowered
    to 17, tensor Constant nodes made initializers (onnx2torch reads Conv weights only from
    initializers), trailing omitted ('') inputs dropped, Conv auto_pad made explicit pads, and
    allowzero=1 dropped from Reshapes whose constant shape has no zero (allowzero only changes
    what a 0 in the shape means)."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    opset = opset_version(prepared) or MAX_OPSET
    if opset > MAX_OPSET:
        try:
            prepared = onnx.version_converter.convert_version(prepared, MAX_OPSET)
        except Exception as e:  # noqa: BLE001 - the C++ converter raises bare RuntimeErrors
            raise OnnxLowrankError(f"cannot lower opset {opset} to {MAX_OPSET} for onnx2torch: {first_line(e)}") from None
    _constants_to_initializers(prepared.graph)
    prepared = infer_shapes(prepared)  # auto_pad needs the input sizes
    index = GraphIndex(prepared.graph)
    for node in prepared.graph.node:
        if node.domain not in ONNX_DOMAINS:
            continue
        while node.input and not node.input[-1]:  # an omitted optional input: onnx2torch looks '' up
            node.input.pop()                      # as a tensor (Clip's absent max, a PyTorch export's)
        if node.op_type == "Conv":
            _explicit_pads(index, node)
        elif node.op_type == "Reshape":
            _drop_needless_allowzero(index, node)
    return prepared


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    graph_outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "Constant" or node.domain not in ONNX_DOMAINS or node.output[0] in graph_outputs:
            continue
        value = constant_node_value(node)
        if value is None or value.dtype.kind not in "biuf":  # strings and sparse values stay nodes
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        graph.node.remove(node)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _drop_attr(node, name)
    if value is not None:
        node.attribute.append(onnx.helper.make_attribute(name, value))


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)


def _explicit_pads(index: GraphIndex, node: onnx.NodeProto) -> None:
    """Replace Conv's auto_pad by the pads it stands for (onnx2torch implements only NOTSET and
    VALID). SAME_* pads so that out = ceil(in / stride), the odd pixel at the end (UPPER) or at
    the start (LOWER), as in the ONNX spec and onnxruntime."""
    attrs = node_attrs(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
    if auto_pad == "NOTSET":
        return
    weight_shape = index.shape(node.input[1])
    kernel = attrs.get("kernel_shape") or (weight_shape[2:] if weight_shape else None)
    if kernel is None or not all(isinstance(k, int) for k in kernel):
        raise OnnxLowrankError(f"{node_name(node)}: cannot make auto_pad explicit, the kernel size is unknown")
    rank = len(kernel)
    head, tail = [0] * rank, [0] * rank
    if auto_pad != "VALID":
        strides = attrs.get("strides", [1] * rank)
        dilations = attrs.get("dilations", [1] * rank)
        in_shape = index.shape(node.input[0])
        for i, (k, s, d) in enumerate(zip(kernel, strides, dilations)):
            extent = (k - 1) * d + 1
            if s == 1:
                total = extent - 1  # does not depend on the input size
            else:
                size = in_shape[2 + i] if in_shape and len(in_shape) == rank + 2 else None
                if not isinstance(size, int):
                    raise OnnxLowrankError(f"{node_name(node)}: auto_pad={auto_pad} with stride {s} needs a "
                                           "static input size, and the input's spatial size is not known")
                total = max(0, (-(-size // s) - 1) * s + extent - size)
            head[i] = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            tail[i] = total - head[i]
    _drop_attr(node, "auto_pad")
    _set_attr(node, "pads", head + tail)


def _drop_needless_allowzero(index: GraphIndex, node: onnx.NodeProto) -> None:
    if node_attrs(node).get("allowzero", 0) != 1:
        return
    shape = index.constant(node.input[1])
    if shape is not None and not (shape == 0).any():
        _drop_attr(node, "allowzero")


def _constant_weights_to_parameters(module: torch.fx.GraphModule) -> None:
    """onnx2torch keeps the constant operands of MatMul (and of a Gemm it cannot turn into
    nn.Linear) as buffers of `module.initializers`; make them Parameters so fine-tuning trains
    them. Other constants (shapes, scales of Mul/Div, exponents) stay buffers."""
    import torch
    from onnx2torch.node_converters.gemm import OnnxGemm
    from onnx2torch.node_converters.matmul import OnnxMatMul

    for fx_node in module.graph.nodes:
        if fx_node.op != "call_module" or not isinstance(module.get_submodule(fx_node.target), (OnnxGemm, OnnxMatMul)):
            continue
        for arg in fx_node.args:
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
                continue
            owner_name, _, attr = arg.target.rpartition(".")
            owner = module.get_submodule(owner_name)
            if attr in owner._buffers and owner._buffers[attr].is_floating_point():
                value = getattr(owner, attr)
                delattr(owner, attr)
                owner.register_parameter(attr, torch.nn.Parameter(value))


class LayerWeight(NamedTuple):
    """The torch parameter holding an ONNX layer's weight: parameter = scale · weight (transposed
    where onnx2torch made a Gemm an nn.Linear). scale is Gemm's alpha, which nn.Linear folds into
    its weight, else 1; so derivatives with respect to the ONNX weight are scale times (second
    derivatives scale² times) those with respect to the parameter."""
    parameter: torch.nn.Parameter
    scale: float


def layer_weights(module: torch.fx.GraphModule, model: onnx.ModelProto,
                  node_names: list[str]) -> dict[str, LayerWeight]:
    """For each named Conv/Gemm/MatMul node of `model` (a node without a name is
    f"{op_type}:{output_name}", as in find_targets), the parameter of `module` = to_torch(model)
    holding its weight. The node is found through the ONNX output name onnx2torch attaches to
    every module, not through onnx2torch's module naming (which rewrites names and numbers
    duplicates)."""
    import torch

    nodes: dict[str, onnx.NodeProto | None] = {}
    for node in model.graph.node:
        key = node_name(node)
        nodes[key] = None if key in nodes else node  # None: the name is ambiguous
    by_output = {m.onnx_mapping.outputs[0]: name for name, m in module.named_modules()
                 if getattr(m, "onnx_mapping", None) is not None and m.onnx_mapping.outputs}
    calls = {n.target: n for n in module.graph.nodes if n.op == "call_module"}
    parameters = dict(module.named_parameters())

    found = {}
    for name in node_names:
        if name not in nodes:
            raise OnnxLowrankError(f"{name}: no node of that name in the model")
        node = nodes[name]
        if node is None:
            raise OnnxLowrankError(f"{name}: several nodes have that name; it does not identify a layer")
        if node.op_type not in TARGET_OPS:
            raise OnnxLowrankError(f"{name}: a {node.op_type} node, not Conv, Gemm or MatMul")
        if node.output[0] not in by_output:
            raise OnnxLowrankError(f"{name}: the torch module has no layer for this node")
        module_name = by_output[node.output[0]]
        sub = module.get_submodule(module_name)
        scale = 1.0
        if isinstance(sub, torch.nn.Sequential):  # Conv with asymmetric pads: (Pad, ConvNd)
            sub = sub[-1]
        if isinstance(sub, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            param = sub.weight
            if isinstance(sub, torch.nn.Linear):
                scale = float(node_attrs(node).get("alpha", 1.0))
        else:
            args = calls[module_name].args
            # Gemm: B; MatMul: the constant side, right (X @ W) before left (W @ X)
            candidates = args[1:2] if node.op_type == "Gemm" else (args[1], args[0])
            targets = [a.target for a in candidates if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
            param = parameters.get(targets[0]) if targets else None
        if not isinstance(param, torch.nn.Parameter):
            raise OnnxLowrankError(f"{name}: the layer's weight is not a constant of the model")
        found[name] = LayerWeight(param, scale)
    return found


def write_back(module: torch.fx.GraphModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` holding `module`'s current parameters, where `module` = to_torch(model)
    and `model` is already in onnx2torch's form (prepare_for_onnx2torch: every weight an
    initializer): each Conv's weight and bias, each Batch/Instance/LayerNormalization's scale and
    bias, each Gemm's B and C (nn.Linear's weight and bias with alpha and beta divided out,
    transposed back), each MatMul/Gemm constant made a Parameter.
    What trained in PyTorch goes back into the graph it came from, names and all, without an
    export: the iterative mode factors the next layer from the weights trained so far."""
    import torch

    scale_and_bias = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm,
                      torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LayerNorm)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {t.name: t for t in out.graph.initializer}
    by_output = {n.output[0]: n for n in out.graph.node if n.output}
    parameters = dict(module.named_parameters())
    written: dict[str, np.ndarray] = {}
    done: set[int] = set()  # the parameters put back

    def put(node: onnx.NodeProto, i: int, parameter: torch.nn.Parameter, value: torch.Tensor | None = None) -> None:
        """`parameter` (as `value`, when it is not the ONNX weight itself) into the node's input i."""
        name = node.input[i] if i < len(node.input) else ""
        tensor = initializers.get(name)
        if tensor is None:
            return  # nowhere to go: reported below as not put back, unless it was not trained
        old = numpy_helper.to_array(tensor)
        new = (parameter if value is None else value).detach().cpu().numpy().astype(old.dtype)
        if new.shape != old.shape:
            raise OnnxLowrankError(f"{name}: trained as {new.shape}, the model holds {old.shape}")
        if name in written and not np.array_equal(written[name], new):
            raise OnnxLowrankError(f"{name}: a weight several layers read was trained apart in each")
        written[name] = new
        tensor.CopyFrom(numpy_helper.from_array(new, name))
        done.add(id(parameter))

    for fx_node in module.graph.nodes:
        if fx_node.op != "call_module":
            continue
        sub = module.get_submodule(fx_node.target)
        mapping = getattr(sub, "onnx_mapping", None)
        if mapping is None or not mapping.outputs or mapping.outputs[0] not in by_output:
            continue
        node = by_output[mapping.outputs[0]]
        if isinstance(sub, torch.nn.Sequential):  # Conv with asymmetric pads: (Pad, ConvNd)
            sub = sub[-1]
        if isinstance(sub, scale_and_bias):  # the weight (or scale) and bias: the node's inputs 1 and 2
            for i, parameter in ((1, sub.weight), (2, sub.bias)):
                if parameter is not None:
                    put(node, i, parameter)
        elif isinstance(sub, torch.nn.Linear):  # a Gemm: weight = alpha * B^T (B if transB), bias = beta * C
            attrs = node_attrs(node)
            alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
            if not alpha:  # B did not reach the output, nn.Linear's weight (0 at first) does: B = it
                _set_attr(node, "alpha", 1.0)
                alpha = 1.0
            weight = sub.weight / alpha
            put(node, 1, sub.weight, weight if attrs.get("transB", 0) else weight.T)
            if sub.bias is not None:
                if not beta:  # likewise C
                    _set_attr(node, "beta", 1.0)
                    beta = 1.0
                put(node, 2, sub.bias, sub.bias / beta)
        for i, arg in enumerate(fx_node.args):  # MatMul/Gemm constants made Parameters
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target in parameters:
                put(node, i, parameters[arg.target])
    # a parameter with no place in the graph (nn.LayerNorm's bias where the node has none) must not
    # have moved: untouched, it is what the graph implies
    unplaced = [(name, p) for name, p in parameters.items() if p.requires_grad and id(p) not in done]
    initial = dict(to_torch(model).named_parameters()) if unplaced else {}
    missed = [name for name, p in unplaced if name not in initial or not torch.equal(p.detach().cpu(), initial[name])]
    if missed:
        raise OnnxLowrankError(f"cannot put the trained {', '.join(missed[:3])} back into the ONNX graph")
    return out
