"""The trained MNIST CNN (models/mnist_cnn.onnx) rebuilt in code in the shapes other exporters give
it: tf2onnx's NHWC graphs, Keras dense layers, PyTorch legacy and dynamo exports at several opsets,
dynamic sizes, weights in Constant nodes, If/Loop subgraphs, QDQ quantization, float16, several
inputs and outputs, concat blocks. Real trained weights, so compression has real structure to find;
each variant computes the network's function (tests check it against the original file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import MODELS


@dataclass
class Conv:
    weight: np.ndarray
    stride: int
    pad: int
    bn: tuple | None  # (scale, bias, mean, var, epsilon) of the BatchNormalization after it

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        scale, bias, mean, var, eps = self.bn
        k = scale / np.sqrt(var + eps)
        return (self.weight * k[:, None, None, None]).astype(np.float32), (bias - mean * k).astype(np.float32)


@dataclass
class Dense:
    weight: np.ndarray  # (out, in), as torch.nn.Linear keeps it
    bias: np.ndarray
    bn: tuple | None = None

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        if self.bn is None:
            return self.weight, self.bias
        scale, bias, mean, var, eps = self.bn
        k = scale / np.sqrt(var + eps)
        return (self.weight * k[:, None]).astype(np.float32), ((self.bias - mean) * k + bias).astype(np.float32)


@dataclass
class Net:
    stem: Conv
    blocks: list[tuple[Conv, Conv, Conv]]  # conv1, conv2, shortcut
    fc1: Dense
    fc2: Dense


def trained_net() -> Net:
    """mnist_cnn's weights, read from the file by their PyTorch names."""
    model = onnx.load(str(MODELS / "mnist_cnn.onnx"))
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    eps = {n.input[1].rsplit(".", 1)[0]: helper.get_attribute_value(a)
           for n in model.graph.node if n.op_type == "BatchNormalization" for a in n.attribute if a.name == "epsilon"}

    def bn(prefix):
        return (w[f"{prefix}.weight"], w[f"{prefix}.bias"], w[f"{prefix}.running_mean"],
                w[f"{prefix}.running_var"], eps.get(prefix, 1e-5))

    blocks = [(Conv(w[f"blocks.{i}.conv1.weight"], 2, 1, bn(f"blocks.{i}.bn1")),
               Conv(w[f"blocks.{i}.conv2.weight"], 1, 1, bn(f"blocks.{i}.bn2")),
               Conv(w[f"blocks.{i}.shortcut.0.weight"], 2, 0, bn(f"blocks.{i}.shortcut.1")))
              for i in range(3)]
    return Net(Conv(w["stem.0.weight"], 1, 1, bn("stem.1")), blocks,
               Dense(w["head.1.weight"], w["head.1.bias"], bn("head.2")), Dense(w["head.4.weight"], w["head.4.bias"]))


class Builder:
    """Nodes and constants of one graph. `constants`: "initializer" or "node" (Constant nodes, as
    exporters that do not fold constants write them); `dtype`: the weights' float type."""

    def __init__(self, dtype=np.float32, constants: str = "initializer", prefix: str = ""):
        self.dtype, self.constants, self.prefix = dtype, constants, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray, cast: bool = True) -> str:
        value = np.asarray(value)
        if cast and value.dtype.kind == "f":
            value = value.astype(self.dtype)
        tensor = numpy_helper.from_array(value, name)
        if self.constants == "node":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_Constant", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        self.count += 1
        name = name or f"{self.prefix}{op}_{self.count}"
        outs = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x: str, conv: Conv, name: str, bn_node: bool = False) -> str:
        kernel = conv.weight.shape[2]
        attrs = dict(kernel_shape=[kernel, kernel], strides=[conv.stride] * 2, pads=[conv.pad] * 4)
        if bn_node:
            y = self.node("Conv", [x, self.const(f"{name}.weight", conv.weight)], name=f"{name}/Conv", **attrs)
            parts = [self.const(f"{name}.bn.{k}", v) for k, v in zip(("scale", "bias", "mean", "var"), conv.bn[:4])]
            return self.node("BatchNormalization", [y] + parts, name=f"{name}/BatchNormalization", epsilon=conv.bn[4])
        weight, bias = conv.folded()
        return self.node("Conv", [x, self.const(f"{name}.weight", weight), self.const(f"{name}.bias", bias)],
                         name=f"{name}/Conv", **attrs)

    def gemm(self, x: str, dense: Dense, name: str) -> str:
        weight, bias = dense.folded()
        return self.node("Gemm", [x, self.const(f"{name}.weight", weight), self.const(f"{name}.bias", bias)],
                         name=f"{name}/Gemm", transB=1)

    def keras_dense(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        """Keras Dense as tf2onnx writes it: MatMul by the (in, out) kernel, then Add of the bias."""
        y = self.node("MatMul", [x, self.const(f"{name}/kernel", weight.T.copy())], name=f"{name}/MatMul")
        return self.node("Add", [y, self.const(f"{name}/bias", bias)], name=f"{name}/BiasAdd")

    def model(self, inputs, outputs, opset: int = 17, ir: int = 8, extra_opsets=()) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "net", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="tests/exporter_models")
        onnx.checker.check_model(model, full_check=True)
        return model


def value(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def nchw_body(b: Builder, net: Net, x: str, bn_node: bool = False, merge: str = "add") -> tuple[str, str]:
    """The convolutional part in PyTorch's layout; returns (features before the head, the last
    block's conv2 output). `merge`: how a block joins its two paths: "add" (residual) or
    "concat" (Concat then a 1x1 conv whose weight is [I I], the same sum)."""
    h = b.node("Relu", [b.conv(x, net.stem, "stem", bn_node)])
    conv2 = None
    for i, (c1, c2, sc) in enumerate(net.blocks):
        a = b.node("Relu", [b.conv(h, c1, f"blocks.{i}.conv1", bn_node)])
        conv2 = b.conv(a, c2, f"blocks.{i}.conv2", bn_node)
        s = b.conv(h, sc, f"blocks.{i}.shortcut", bn_node)
        if merge == "add":
            joined = b.node("Add", [conv2, s])
        else:
            channels = c2.weight.shape[0]
            eye = np.eye(channels, dtype=np.float32)
            ident = np.concatenate([eye, eye], axis=1)[:, :, None, None]
            cat = b.node("Concat", [conv2, s], axis=1)
            joined = b.node("Conv", [cat, b.const(f"blocks.{i}.merge.weight", ident)], kernel_shape=[1, 1])
        h = b.node("Relu", [joined])
    return h, conv2


def nchw_head(b: Builder, net: Net, h: str) -> tuple[str, str]:
    """Flatten, Gemm, ReLU, Gemm: (logits, the 256-wide embedding)."""
    flat = b.node("Flatten", [h], axis=1)
    embedding = b.node("Relu", [b.gemm(flat, net.fc1, "head.1")])
    return b.gemm(embedding, net.fc2, "head.4"), embedding


def pytorch(net: Net, opset: int, dynamo: bool = False, dims=("batch", 1, 28, 28)) -> onnx.ModelProto:
    """PyTorch's exporters: legacy (TorchScript, opsets 11-17: BN folded into the convs by its
    constant folding) and dynamo (opset 18+, IR 10: BatchNormalization nodes kept, dynamo's node
    names)."""
    b = Builder(prefix="node_" if dynamo else "/")
    h, _ = nchw_body(b, net, "input", bn_node=dynamo)
    logits, _ = nchw_head(b, net, h)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name=f"{b.prefix}Identity_out"))
    ir = 10 if dynamo else {11: 6, 13: 7}.get(opset, 8)  # the IR version each exporter wrote
    return b.model([value("input", list(dims))], [value("logits", [dims[0], 10])], opset, ir)


def tf2onnx_nhwc(net: Net, opset: int = 13) -> onnx.ModelProto:
    """tf2onnx's Keras model: NHWC input, every Conv wrapped in Transposes to NCHW and back,
    residual Adds in NHWC, Flatten as Reshape in NHWC order, Dense as MatMul + Add."""
    b = Builder(prefix="model/")

    def conv(x, conv_, name):
        t = b.node("Transpose", [x], perm=[0, 3, 1, 2], name=f"{name}__to_nchw")
        weight, bias = conv_.folded()
        kernel = weight.shape[2]
        y = b.node("Conv", [t, b.const(f"{name}/kernel", weight), b.const(f"{name}/bias", bias)],
                   name=f"{name}/Conv2D", kernel_shape=[kernel] * 2, strides=[conv_.stride] * 2, pads=[conv_.pad] * 4)
        return b.node("Transpose", [y], perm=[0, 2, 3, 1], name=f"{name}__to_nhwc")

    h = b.node("Relu", [conv("input_1", net.stem, "model/stem")])
    for i, (c1, c2, sc) in enumerate(net.blocks):
        a = b.node("Relu", [conv(h, c1, f"model/block{i}_conv1")])
        joined = b.node("Add", [conv(a, c2, f"model/block{i}_conv2"), conv(h, sc, f"model/block{i}_shortcut")])
        h = b.node("Relu", [joined])
    flat = b.node("Reshape", [h, b.const("model/flatten/shape", np.array([-1, 2048], np.int64))])
    # the PyTorch head reads (C, H, W) order; Keras flattens (H, W, C): permute its columns
    w1, b1 = net.fc1.folded()
    w1 = w1.reshape(256, 128, 4, 4).transpose(0, 2, 3, 1).reshape(256, 2048)
    embedding = b.node("Relu", [b.keras_dense(flat, w1, b1, "model/dense")])
    logits = b.keras_dense(embedding, *net.fc2.folded(), "model/dense_1")
    b.nodes.append(helper.make_node("Softmax", [logits], ["dense_1"], axis=1, name="model/dense_1/Softmax"))
    return b.model([value("input_1", ["unk__0", 28, 28, 1])], [value("dense_1", ["unk__1", 10])], opset, 8)


def constant_nodes(net: Net) -> onnx.ModelProto:
    """Every weight a Constant node (an export without constant folding)."""
    b = Builder(constants="node")
    h, _ = nchw_body(b, net, "input")
    logits, _ = nchw_head(b, net, h)
    return b.model([value("input", ["N", 1, 28, 28])], [value(logits, ["N", 10])])


def dynamic_hw(net: Net) -> onnx.ModelProto:
    """Batch, height and width all symbolic, as a dynamic_axes export writes them."""
    return pytorch(net, 17, dims=("batch", 1, "height", "width"))


def float16(net: Net, keep_io_types: bool) -> onnx.ModelProto:
    """Weights and activations in float16. `keep_io_types`: float32 input and output with Casts
    around the network (onnxconverter-common's convert_float_to_float16(keep_io_types=True))."""
    b = Builder(dtype=np.float16)
    io = TensorProto.FLOAT if keep_io_types else TensorProto.FLOAT16
    x = b.node("Cast", ["input"], to=TensorProto.FLOAT16) if keep_io_types else "input"
    h, _ = nchw_body(b, net, x)
    logits, _ = nchw_head(b, net, h)
    if keep_io_types:
        logits = b.node("Cast", [logits], to=TensorProto.FLOAT)
    return b.model([value("input", ["N", 1, 28, 28], io)], [value(logits, ["N", 10], io)])


def multi_io(net: Net) -> onnx.ModelProto:
    """Two inputs (the image, and a per-class prior added to the logits) and three outputs (the
    logits, the embedding, and the pooled output of the last conv, whose Conv thereby feeds
    two consumers: the residual Add and a GlobalAveragePool)."""
    b = Builder()
    h, conv2 = nchw_body(b, net, "image")
    logits, embedding = nchw_head(b, net, h)
    out = b.node("Add", [logits, "prior"])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [conv2])], axis=1)
    return b.model([value("image", ["N", 1, 28, 28]), value("prior", ["N", 10])],
                   [value(out, ["N", 10]), value(embedding, ["N", 256]), value(pooled, ["N", 128])])


def concat_blocks(net: Net) -> onnx.ModelProto:
    """Each block's two paths joined by Concat and a 1x1 conv instead of Add (DenseNet/Inception-
    style joins)."""
    b = Builder()
    h, _ = nchw_body(b, net, "input", merge="concat")
    logits, _ = nchw_head(b, net, h)
    return b.model([value("input", ["N", 1, 28, 28])], [value(logits, ["N", 10])])


def if_head(net: Net) -> onnx.ModelProto:
    """The classifier head inside an If (a data-dependent switch: the then branch is the real head,
    the else branch zeros). The branches read the head's weights from the outer scope, and the then
    branch also reads the first block's shortcut weight (its Size, times zero), so that conv's
    weight is shared with a subgraph and must not be factored."""
    b = Builder()
    h, _ = nchw_body(b, net, "input")
    for name, dense in (("head.1", net.fc1), ("head.4", net.fc2)):
        weight, bias = dense.folded()
        b.const(f"{name}.weight", weight)
        b.const(f"{name}.bias", bias)
    zero = b.const("zero", np.array(0, np.int64))
    then = Builder(prefix="then_")
    emb = then.node("Relu", [then.node("Gemm", [then.node("Flatten", [h], axis=1), "head.1.weight", "head.1.bias"],
                                       transB=1)])
    logits = then.node("Gemm", [emb, "head.4.weight", "head.4.bias"], transB=1)
    nothing = then.node("Cast", [then.node("Mul", [then.node("Size", ["blocks.0.shortcut.weight"]), zero])],
                        to=TensorProto.FLOAT)
    then_out = then.node("Add", [logits, nothing])
    other = Builder(prefix="else_")
    batch = other.node("Slice", [other.node("Shape", [h]), b.const("at0", np.array([0], np.int64)),
                                 b.const("at1", np.array([1], np.int64))])
    shape = other.node("Concat", [batch, b.const("ten", np.array([10], np.int64))], axis=0)
    zeros = other.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([0.0], np.float32)))
    cond = b.node("Greater", [b.node("ReduceMax", [h], keepdims=0), b.const("minus_one", np.array(-1.0, np.float32))])
    out = b.node("If", [cond], then_branch=helper.make_graph(then.nodes, "then", [], [value(then_out, ["N", 10])]),
                 else_branch=helper.make_graph(other.nodes, "else", [], [value(zeros, ["N", 10])]))
    return b.model([value("input", ["N", 1, 28, 28])], [value(out, ["N", 10])])


def loop_block(net: Net) -> onnx.ModelProto:
    """The first block's conv1 inside a Loop body run once (its weight read from the outer
    scope): a subgraph the converter leaves alone while it factors the main graph."""
    b = Builder()
    h = b.node("Relu", [b.conv("input", net.stem, "stem")])
    c1, c2, sc = net.blocks[0]
    weight, bias = c1.folded()
    b.const("loop.conv.weight", weight)
    b.const("loop.conv.bias", bias)
    body = Builder(prefix="body_")
    y = body.node("Relu", [body.node("Conv", [h, "loop.conv.weight", "loop.conv.bias"], kernel_shape=[3, 3],
                                     strides=[2, 2], pads=[1, 1, 1, 1])])
    cond_out = body.node("Identity", ["cond_in"])
    body_graph = helper.make_graph(
        body.nodes, "body", [value("iter", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL)],
        [value(cond_out, [], TensorProto.BOOL), value(y, ["N", 64, 14, 14])])
    trips = b.const("trips", np.array(1, np.int64))
    true = b.const("true", np.array(True))
    scanned = b.node("Loop", [trips, true], outputs=1, body=body_graph)  # (trips, N, 64, 14, 14)
    a = b.node("Squeeze", [scanned, b.const("axis0", np.array([0], np.int64))])
    joined = b.node("Add", [b.conv(a, c2, "blocks.0.conv2"), b.conv(h, sc, "blocks.0.shortcut")])
    h = b.node("Relu", [joined])
    for i, (c1, c2, sc) in list(enumerate(net.blocks))[1:]:
        a = b.node("Relu", [b.conv(h, c1, f"blocks.{i}.conv1")])
        h = b.node("Relu", [b.node("Add", [b.conv(a, c2, f"blocks.{i}.conv2"), b.conv(h, sc, f"blocks.{i}.shortcut")])])
    logits, _ = nchw_head(b, net, h)
    return b.model([value("input", ["N", 1, 28, 28])], [value(logits, ["N", 10])])


def qdq(net: Net) -> onnx.ModelProto:
    """The convolutions quantized as onnxruntime's static quantization writes them (QDQ format):
    int8 weights per output channel with DequantizeLinear, activations through QuantizeLinear +
    DequantizeLinear (uint8). The head stays float."""
    b = Builder()
    quantized: dict[str, str] = {}

    def fake_quant(x: str, scale: float) -> str:  # once per tensor, however many read it
        if x not in quantized:
            s = b.const(f"{x}_scale", np.array(scale, np.float32))
            z = b.const(f"{x}_zero", np.array(128, np.uint8), cast=False)
            quantized[x] = b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, s, z]), s, z])
        return quantized[x]

    def conv(x: str, conv_: Conv, name: str) -> str:
        weight, bias = conv_.folded()
        scale = np.abs(weight).reshape(len(weight), -1).max(1) / 127
        q = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
        w = b.node("DequantizeLinear", [b.const(f"{name}.weight_q", q, cast=False), b.const(f"{name}.weight_scale", scale),
                                        b.const(f"{name}.weight_zero", np.zeros(len(q), np.int8), cast=False)], axis=0)
        kernel = weight.shape[2]
        return b.node("Conv", [fake_quant(x, 8 / 255), w, b.const(f"{name}.bias", bias)], kernel_shape=[kernel] * 2,
                      strides=[conv_.stride] * 2, pads=[conv_.pad] * 4)

    h = b.node("Relu", [conv("input", net.stem, "stem")])
    for i, (c1, c2, sc) in enumerate(net.blocks):
        a = b.node("Relu", [conv(h, c1, f"blocks.{i}.conv1")])
        h = b.node("Relu", [b.node("Add", [conv(a, c2, f"blocks.{i}.conv2"), conv(h, sc, f"blocks.{i}.shortcut")])])
    logits, _ = nchw_head(b, net, h)
    return b.model([value("input", ["N", 1, 28, 28])], [value(logits, ["N", 10])], opset=13)
