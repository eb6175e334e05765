"""The last touches before a compressed model is written, each optional: merging adjacent linear
layers where one layer is cheaper than two, and weights stored in float16 (onnxruntime's own
offline optimization, the third, is runtime.sessions.offline_optimized). Each returns a new model
that computes the same thing (float16 up to its rounding), and the pipeline verifies the result
after them, so the held-out drop it reports is that of the file it writes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import GraphIndex, UniqueNames, node_attrs
from .prepare import drop_unused, infer_shapes


def _pointwise_conv(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    """The (T, C) matrix of a 1x1, stride-1, unpadded, ungrouped conv with a constant weight."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    w = index.constant(node.input[1])
    if w is None or w.ndim < 3 or any(k != 1 for k in w.shape[2:]):
        return None
    n, attrs = w.ndim - 2, node_attrs(node)
    if (attrs.get("group", 1) != 1 or any(s != 1 for s in attrs.get("strides", [1] * n))
            or any(p != 0 for p in attrs.get("pads", [0] * 2 * n))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")):
        return None
    return w.reshape(w.shape[0], w.shape[1])


def _dense(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    """The (out, in) matrix of a Gemm (transA=0, alpha=1) or MatMul X @ W with a constant weight."""
    if node.op_type == "MatMul":
        w = index.constant(node.input[1])
        return None if w is None or w.ndim != 2 or index.constant(node.input[0]) is not None else w.T
    attrs = node_attrs(node)
    if node.op_type == "Gemm" and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0:
        w = index.constant(node.input[1])
        if w is None or w.ndim != 2:
            return None
        return w if attrs.get("transB", 0) else w.T
    return None


def _bias(node: onnx.NodeProto, index: GraphIndex, rows: int) -> np.ndarray | None:
    """The node's additive bias as a (rows,) vector (zeros without one); None if not constant."""
    bias_at = {"Conv": 2, "Gemm": 2}.get(node.op_type)
    if bias_at is None or len(node.input) <= bias_at or not node.input[bias_at]:
        return np.zeros(rows)
    b = index.constant(node.input[bias_at])
    if b is None:
        return None
    beta = node_attrs(node).get("beta", 1.0) if node.op_type == "Gemm" else 1.0
    if b.size not in (1, rows):
        return None
    return beta * np.broadcast_to(b.reshape(-1), (rows,)).astype(np.float64)


def merge_linear_pairs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Merge a linear layer into the one after it (1x1 conv into 1x1 conv, Gemm/MatMul into
    Gemm/MatMul) when nothing else reads the first one's output and one matrix costs fewer MACs
    than the two: B(Ax + a) + b = (BA)x + (Ba + b). Low-rank chains meet like this where a
    factored layer feeds another without an activation between (MobileNetV2's linear
    bottlenecks): the thin ends meet, and the wide middle goes. Returns the model and the count."""
    merged = 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    while True:
        index = GraphIndex(out.graph)
        pair = _find_pair(out.graph, index)
        if pair is None:
            break
        first, second, a, b, bias = pair
        w = b @ a  # (out2, in1)
        first_weight = index.constant(first.input[1])
        dtype = first_weight.dtype
        base = second.name or second.output[0]
        # the merged node keeps the second's name: the rewrite's chains (and quantization's units) know it by it
        name = second.name or f"{base}/merged"
        names = UniqueNames(index.names())
        w_name, b_name = names.new(f"{base}/merged/W"), names.new(f"{base}/merged/B")
        if second.op_type == "Conv":
            ndim = first_weight.ndim - 2
            weight = w.reshape(w.shape + (1,) * ndim)
            node = helper.make_node("Conv", [first.input[0], w_name, b_name], [second.output[0]],
                                    name=name, kernel_shape=[1] * ndim)
        elif second.op_type == "Gemm" or first.op_type == "Gemm":
            weight = w
            node = helper.make_node("Gemm", [first.input[0], w_name, b_name], [second.output[0]],
                                    name=name, transB=1)
        else:
            weight = w.T
            node = helper.make_node("MatMul", [first.input[0], w_name], [second.output[0]], name=name)
        inits = [numpy_helper.from_array(weight.astype(dtype), w_name)]
        if node.op_type != "MatMul":
            inits.append(numpy_helper.from_array(bias.astype(dtype), b_name))
        nodes = []
        for n in out.graph.node:
            if n is first:
                continue
            nodes.append(node if n is second else n)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(inits)
        drop_unused(out.graph)
        merged += 1
    if merged:
        del out.graph.value_info[:]
        out = infer_shapes(out)
    return out, merged


def _find_pair(graph: onnx.GraphProto, index: GraphIndex):
    for second in graph.node:
        if not second.input:
            continue
        first = index.producer.get(second.input[0])
        if first is None or index.uses(first.output[0]) != 1:
            continue
        if first.op_type == "Conv" and second.op_type == "Conv":
            a, b = _pointwise_conv(first, index), _pointwise_conv(second, index)
        elif first.op_type in ("Gemm", "MatMul") and second.op_type in ("Gemm", "MatMul"):
            # with a Gemm on either side the activation is 2-D, so the merged layer is a Gemm;
            # two MatMuls (N-D activations, no bias) stay a MatMul
            a, b = _dense(first, index), _dense(second, index)
        else:
            continue
        if a is None or b is None or a.shape[0] != b.shape[1]:
            continue
        (t1, c1), t2 = a.shape, b.shape[0]
        if t2 * c1 >= t1 * c1 + t2 * t1:
            continue
        bias_a, bias_b = _bias(first, index, t1), _bias(second, index, t2)
        if bias_a is None or bias_b is None:
            continue
        return first, second, a.astype(np.float64), b.astype(np.float64), b.astype(np.float64) @ bias_a + bias_b
    return None


def fp16_weights(model: onnx.ModelProto, min_elements: int = 16) -> onnx.ModelProto:
    """Float32 initializers of at least `min_elements` stored as float16, each read through a
    Cast back to float32: half the file, the same float32 compute (onnxruntime folds the Casts
    when it loads the model), so it runs on every provider."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inputs = {i.name for i in graph.input}
    casts = []
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or t.name in inputs or int(np.prod(t.dims)) < min_elements:
            continue
        value = numpy_helper.to_array(t)
        half = f"{t.name}/fp16"
        casts.append(helper.make_node("Cast", [half], [t.name], name=f"{t.name}/to_float", to=onnx.TensorProto.FLOAT))
        t.CopyFrom(numpy_helper.from_array(value.astype(np.float16), half))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return infer_shapes(out)
