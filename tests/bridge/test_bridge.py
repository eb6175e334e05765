"""The PyTorch bridge: onnx2torch conversion that matches onnxruntime, the ONNX node → torch
parameter mapping, and the Hutchinson Hessian traces checked against exact Hessians."""

import sys

import numpy as np
import onnx
import pytest
from helpers import MODELS, conv_model, init, make_model, run, tensor
from onnx import helper

from onnx_lowrank.bridge import (deps, hessian_traces, layer_weights, prepare_for_onnx2torch, require_torch, to_torch,
                                 write_back)
from onnx_lowrank.errors import OnnxLowrankError
from onnx_lowrank.graph.index import GraphIndex, node_attrs

try:
    require_torch()  # onnx2torch cannot be imported directly here: it needs torchvision
except OnnxLowrankError as e:
    pytest.skip(str(e), allow_module_level=True)
import torch

# the 2 cores are shared: torch's default of one thread per core slows it ~20x when they are busy
torch.set_num_threads(1)

RNG = np.random.default_rng(0)


def randn(*shape, rng=RNG):
    return rng.standard_normal(shape).astype(np.float32)


def digit_cnn():
    return onnx.load(str(MODELS / "digit_cnn.onnx"))


def matmul_model(weight_side="right", rng=RNG):
    x, w = ("x", "W") if weight_side == "right" else ("W", "x")
    in_shape = [2, 3, 5] if weight_side == "right" else [2, 5, 3]
    node = helper.make_node("MatMul", [x, w], ["y"], name="mm")
    return make_model([node], [tensor("x", in_shape)], [tensor("y", None)],
                      [init("W", randn(5, 4, rng=rng) if weight_side == "right" else randn(4, 5, rng=rng))])


def gemm_model(trans_a=0, alpha=1.0):
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transA=trans_a, transB=1, alpha=alpha)
    return make_model([node], [tensor("x", [6, 3] if trans_a else [3, 6])], [tensor("y", None)],
                      [init("W", randn(4, 6)), init("b", randn(4))])


def opset18_model():
    """Conv → ReduceMean-18 (axes as an input) → Reshape with allowzero=1: none of these
    converts in onnx2torch before the opset is lowered and allowzero dropped."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["y"], allowzero=1)]
    inits = [init("W", randn(6, 4, 3, 3)), init("axes", np.array([3], np.int64)),
             init("shape", np.array([2, 6, 7], np.int64))]
    return make_model(nodes, [tensor("x", [2, 4, 7, 7])], [tensor("y", None)], inits, opset=18)


def opset21_model():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", auto_pad="SAME_LOWER", strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y"])]
    inits = [init("W", randn(3, 4, 3, 3)), init("B", randn(3))]
    return make_model(nodes, [tensor("x", [1, 4, 9, 9])], [tensor("y", None)], inits, opset=21, ir=10)


MODELS_TO_CONVERT = {
    "digit_cnn": digit_cnn,
    "conv_asymmetric_pads": lambda: conv_model(randn(5, 4, 3, 3), randn(5), pads=[0, 1, 2, 1]),
    "conv_same_upper_stride2": lambda: conv_model(randn(5, 4, 3, 3), randn(5), input_shape=(1, 4, 9, 8),
                                                  strides=[2, 2], auto_pad="SAME_UPPER"),
    # (onnxruntime rejects dilations with SAME_*)
    "conv_same_upper_odd_kernel": lambda: conv_model(randn(5, 4, 2, 3), input_shape=(1, 4, 10, 9),
                                                     strides=[3, 2], auto_pad="SAME_UPPER"),
    "conv_same_lower": lambda: conv_model(randn(5, 4, 2, 2), input_shape=(1, 4, 9, 9), auto_pad="SAME_LOWER"),
    "conv_valid": lambda: conv_model(randn(5, 4, 3, 3), strides=[2, 2], auto_pad="VALID"),
    "conv_weight_in_constant_node": lambda: conv_model(randn(5, 4, 3, 3), weight_in_constant_node=True),
    "matmul_right": matmul_model,
    "matmul_left": lambda: matmul_model("left"),
    "gemm_transB_alpha": lambda: gemm_model(alpha=0.5),
    "gemm_transA": lambda: gemm_model(trans_a=1),
    "opset18": opset18_model,
    "opset21": opset21_model,
}


def random_feeds(model, batch=2):
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = RNG.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", list(MODELS_TO_CONVERT))
def test_to_torch_matches_onnxruntime(name):
    model = MODELS_TO_CONVERT[name]()
    feeds = random_feeds(model)
    before = model.SerializeToString()
    module = to_torch(model)
    assert model.SerializeToString() == before  # the input model is not touched
    assert not module.training
    with torch.no_grad():
        got = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    ref = run(model, feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_matmul_weight_is_a_trainable_parameter():
    # onnx2torch makes it a buffer: an optimiser over module.parameters() would never see it
    model = matmul_model()
    module = to_torch(model)
    weight = layer_weights(module, model, ["mm"])["mm"].parameter
    assert isinstance(weight, torch.nn.Parameter) and weight.shape == (5, 4)
    assert any(p is weight for p in module.parameters())
    x = torch.from_numpy(random_feeds(model)["x"])
    module(x).square().sum().backward()
    np.testing.assert_allclose(weight.grad.numpy(), 2 * np.einsum("bik,bij->kj", x.numpy(), module(x).detach().numpy()),
                               rtol=1e-4, atol=1e-5)


def test_layer_weights_of_the_digit_cnn():
    model = digit_cnn()
    module = to_torch(model)
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    found = layer_weights(module, model, names)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in found:
            # the module's weight for this node holds this node's ONNX weight (Gemm: transB=1 kept as is)
            np.testing.assert_array_equal(found[node.name].parameter.detach().numpy(), inits[node.input[1]])


@pytest.mark.parametrize("name, node", [("conv_asymmetric_pads", "conv"), ("conv_weight_in_constant_node", "conv"),
                                        ("matmul_left", "mm"), ("gemm_transA", "fc"), ("gemm_transB_alpha", "fc")])
def test_layer_weight_holds_the_onnx_weight(name, node):
    """Every way onnx2torch stores a weight: ConvNd (alone or after a Pad), the constant side of
    a MatMul, an OnnxGemm operand, an nn.Linear with alpha folded in."""
    model = MODELS_TO_CONVERT[name]()
    found = layer_weights(to_torch(model), model, [node])[node]
    onnx_node = next(n for n in model.graph.node if n.name == node)
    index = GraphIndex(model.graph)
    expected = index.constant(onnx_node.input[1]) if index.is_constant(onnx_node.input[1]) else index.constant(onnx_node.input[0])
    got = found.parameter.detach().numpy() / found.scale
    np.testing.assert_allclose(got if got.shape == expected.shape else got.T, expected, rtol=1e-6)


def test_prepared_model_is_what_onnx2torch_takes():
    prepared = prepare_for_onnx2torch(opset18_model())
    assert prepared.opset_import[0].version == 17
    assert not any(a.name == "allowzero" for n in prepared.graph.node for a in n.attribute)
    same = prepare_for_onnx2torch(conv_model(randn(5, 4, 3, 3), input_shape=(1, 4, 9, 8), strides=[2, 2],
                                             auto_pad="SAME_UPPER"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in same.graph.node[0].attribute}
    # out = ceil(in/2): 5x4; padding needed 2 (H) and 1 (W), the odd one at the end
    assert "auto_pad" not in attrs and attrs["pads"] == [1, 0, 1, 1]


def test_same_pads_with_stride_need_a_static_size():
    model = conv_model(randn(5, 4, 3, 3), input_shape=(1, 4, "H", "W"), strides=[2, 2], auto_pad="SAME_UPPER")
    with pytest.raises(OnnxLowrankError, match="static input size"):
        to_torch(model)


def test_reshape_allowzero_with_a_zero_is_reported():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    model = make_model(nodes, [tensor("x", [2, 0, 3])], [tensor("y", None)], [init("shape", np.array([0, 6], np.int64))])
    with pytest.raises(OnnxLowrankError, match="onnx2torch cannot convert.*allowzero"):
        to_torch(model)


def test_unnamed_nodes_are_op_type_and_output():
    model = matmul_model()
    model.graph.node[0].name = ""
    module = to_torch(model)
    assert list(layer_weights(module, model, ["MatMul:y"])) == ["MatMul:y"]


def test_names_onnx2torch_would_merge_stay_apart():
    # onnx2torch turns "." into "/" and numbers duplicates: "l.0" and "l/0" both become "l/0"
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="l.0"),
             helper.make_node("MatMul", ["h", "W1"], ["y"], name="l/0")]
    w0, w1 = randn(3, 4), randn(4, 2)
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", None)], [init("W0", w0), init("W1", w1)])
    found = layer_weights(to_torch(model), model, ["l/0", "l.0"])
    np.testing.assert_array_equal(found["l.0"].parameter.detach().numpy(), w0)
    np.testing.assert_array_equal(found["l/0"].parameter.detach().numpy(), w1)


@pytest.mark.parametrize("name, error", [("nope", "no node"), ("relu", "not Conv"), ("mm2", "not a constant")])
def test_layer_weights_errors(name, error):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "x2"], ["y"], name="mm2")]
    model = make_model(nodes, [tensor("x", [2, 3]), tensor("x2", [4, 2])], [tensor("y", None)],
                       [init("W", randn(3, 4))])
    with pytest.raises(OnnxLowrankError, match=error):
        layer_weights(to_torch(model), model, [name])


@pytest.mark.skipif(not deps.torchvision_stubbed, reason="torchvision is installed")
def test_onnx2torch_imported_without_torchvision():
    # the stand-in torchvision served onnx2torch's import only; nothing else can find it
    assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"])]
    model = make_model(nodes, [tensor("boxes", [1, 4, 4]), tensor("scores", [1, 1, 4])],
                       [tensor("y", None, onnx.TensorProto.INT64)])
    with pytest.raises(OnnxLowrankError, match="torchvision is not installed"):
        to_torch(model)


# --- Hessian traces against exact Hessians ---------------------------------------------------

def two_layer_model(alpha, rng):
    """x (N,5) → MatMul W1 (5,4) → Tanh → Gemm(W2 (3,4), transB, alpha) → logits (N,3)."""
    w1, w2 = randn(5, 4, rng=rng), randn(3, 4, rng=rng)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "W2"], ["y"], name="fc", transB=1, alpha=alpha)]
    model = make_model(nodes, [tensor("x", ["N", 5])], [tensor("y", ["N", 3])], [init("W1", w1), init("W2", w2)])
    return model, w1.astype(np.float64), w2.astype(np.float64)


def exact_blocks(loss_of, weights, batches):
    """Per weight and per batch: the exact Hessian block of the batch's loss (float64)."""
    weights = [torch.from_numpy(w) for w in weights]
    blocks = []
    for i, w in enumerate(weights):
        per_batch = []
        for batch in batches:
            def f(wi, i=i, batch=batch):
                ws = list(weights)
                ws[i] = wi
                return loss_of(ws, batch)
            h = torch.autograd.functional.hessian(f, w)
            per_batch.append(h.reshape(w.numel(), w.numel()).numpy())
        blocks.append(per_batch)
    return blocks


def check_against_exact(estimates, blocks, shares, probes):
    for est, per_batch in zip(estimates, blocks):
        exact = sum(s * np.trace(h) for s, h in zip(shares, per_batch))
        # Hutchinson with Rademacher vectors: Var(vᵀHv) = 2·Σ_{a≠b} H_ab², one draw per probe and batch
        var = sum(s**2 * 2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / probes for s, h in zip(shares, per_batch))
        tolerance = 4 * np.sqrt(var) + 1e-4 * abs(exact)
        assert tolerance < 0.3 * abs(exact)  # else the comparison would prove nothing
        assert abs(est - exact) <= tolerance, (est, exact, tolerance)


def test_hessian_trace_with_labels_matches_exact():
    rng = np.random.default_rng(1)
    model, w1, w2 = two_layer_model(0.5, rng)
    x = rng.standard_normal((12, 5))

    def logits_of(ws, batch=slice(None)):
        return 0.5 * torch.tanh(torch.from_numpy(x[batch]) @ ws[0]) @ ws[1].T

    # labels like those of a trained model: mostly its own top-1, a quarter wrong. (Random labels
    # make the block's Hessian indefinite, its trace small next to the estimator's noise.)
    labels = logits_of([torch.from_numpy(w1), torch.from_numpy(w2)]).argmax(1).numpy()
    labels[::4] = (labels[::4] + 1) % 3
    probes = 400
    got = hessian_traces(model, ["mm", "fc"], {"x": x}, labels=labels, probes=probes, batch_size=8, joint=False)

    def loss_of(ws, batch):
        return torch.nn.functional.cross_entropy(logits_of(ws, batch), torch.from_numpy(labels[batch]))

    blocks = exact_blocks(loss_of, [w1, w2], [slice(0, 8), slice(8, 12)])
    check_against_exact([got["mm"], got["fc"]], blocks, [8 / 12, 4 / 12], probes)


def test_hessian_trace_without_labels_uses_own_predictions():
    rng = np.random.default_rng(2)
    model, w1, w2 = two_layer_model(1.0, rng)
    x = rng.standard_normal((10, 5))
    got = hessian_traces(model, ["mm", "fc"], {"x": x}, probes=400, joint=False)

    def logits_of(ws):
        return torch.tanh(torch.from_numpy(x) @ ws[0]) @ ws[1].T

    top1 = logits_of([torch.from_numpy(w1), torch.from_numpy(w2)]).argmax(1)
    assert len(set(top1.tolist())) > 1
    blocks = exact_blocks(lambda ws, _: torch.nn.functional.cross_entropy(logits_of(ws), top1), [w1, w2], [None])
    check_against_exact([got["mm"], got["fc"]], blocks, [1.0], 400)


def test_joint_probes_match_exact_within_their_larger_noise():
    """One probe over both layers at once: each layer's estimate stays unbiased; its variance
    per probe is 2 * sum of the block's off-diagonal H_ab^2 plus the sum of H_ab^2 from that
    layer to the other."""
    rng = np.random.default_rng(4)
    model, w1, w2 = two_layer_model(1.0, rng)
    x = rng.standard_normal((10, 5))
    probes = 800
    got = hessian_traces(model, ["mm", "fc"], {"x": x}, probes=probes)

    def loss(a, b):
        logits = torch.tanh(torch.from_numpy(x) @ a) @ b.T
        return torch.nn.functional.cross_entropy(logits, logits.detach().argmax(1))

    h = torch.autograd.functional.hessian(loss, (torch.from_numpy(w1), torch.from_numpy(w2)))
    sizes = [w1.size, w2.size]
    full = np.block([[h[i][j].reshape(sizes[i], sizes[j]).numpy() for j in range(2)] for i in range(2)])
    edges = np.cumsum([0] + sizes)
    for k, name in enumerate(["mm", "fc"]):
        rows = slice(edges[k], edges[k + 1])
        block = full[rows, rows]
        exact = np.trace(block)
        var = (2 * (np.sum(block ** 2) - np.sum(np.diag(block) ** 2)) + np.sum(full[rows] ** 2)
               - np.sum(block ** 2)) / probes
        tolerance = 4 * np.sqrt(var)
        assert tolerance < 0.3 * abs(exact)
        assert abs(got[name] - exact) <= tolerance, (name, got[name], exact, tolerance)


def test_hessian_trace_mse_for_non_classifier_output():
    rng = np.random.default_rng(3)
    model = matmul_model(rng=rng)  # y (N,3,4) = x (N,3,5) @ W (5,4) → Tanh
    model.graph.node.append(helper.make_node("Tanh", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    x = rng.standard_normal((4, 3, 5))
    got = hessian_traces(model, ["mm"], {"x": x}, probes=400, joint=False)
    target = torch.tanh(torch.from_numpy(x) @ torch.from_numpy(w))
    # MSE against the model's own output: zero loss and gradient, Hessian 2/numel·JᵀJ
    blocks = exact_blocks(lambda ws, _: torch.mean((torch.tanh(torch.from_numpy(x) @ ws[0]) - target) ** 2),
                          [w], [None])
    check_against_exact([got["mm"]], blocks, [1.0], 400)


def test_hessian_traces_on_the_digit_cnn():
    model = digit_cnn()
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    x = np.random.default_rng(1).random((12, 1, 28, 28), dtype=np.float32)
    traces = hessian_traces(model, names, {"image": x}, probes=2, batch_size=6, joint=False)
    assert list(traces) == names
    # per layer, the diagonal is counted exactly and the few probes' noise stays small
    assert all(isinstance(t, float) and np.isfinite(t) and t > 0 for t in traces.values())
    joint = hessian_traces(model, names, {"image": x}, probes=2, batch_size=6)
    assert list(joint) == names and all(np.isfinite(t) for t in joint.values())
    average = hessian_traces(model, names, {"image": x}, probes=2, batch_size=6, average=True, joint=False)
    sizes = {t.name: t.dims for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in traces:
            assert average[node.name] == pytest.approx(traces[node.name] / np.prod(sizes[node.input[1]]))


@pytest.mark.parametrize("inputs, labels, error", [
    ({"nope": np.zeros((2, 5))}, None, "missing"),
    ({"x": np.zeros((2, 5))}, np.zeros(3, np.int64), "labels"),
])
def test_hessian_traces_input_errors(inputs, labels, error):
    model, _, _ = two_layer_model(1.0, np.random.default_rng(4))
    with pytest.raises(OnnxLowrankError, match=error):
        hessian_traces(model, ["mm"], inputs, labels=labels)


def gemm_then(op: str, **attrs):
    """Gemm (3x6 @ 6x4 + 4) into `op` with scale and bias inputs: LayerNormalization or, over a
    (3, 2, 2) view, InstanceNormalization."""
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["g"], name="fc", **attrs)]
    if op == "InstanceNormalization":
        nodes.append(helper.make_node("Reshape", ["g", "shape"], ["r"], name="view"))
    nodes.append(helper.make_node(op, ["r" if op == "InstanceNormalization" else "g", "scale", "bias"], ["y"],
                                  name="norm"))
    channels = 2 if op == "InstanceNormalization" else 4
    inits = [init("W", randn(6, 4)), init("b", randn(4)), init("scale", randn(channels)),
             init("bias", randn(channels)), init("shape", np.array([3, 2, 2], np.int64))]
    return make_model(nodes, [tensor("x", [3, 6])], [tensor("y", None)], inits)


WRITE_BACK = dict(MODELS_TO_CONVERT, mnist_cnn=lambda: onnx.load(str(MODELS / "mnist_cnn.onnx")),
                  gemm_alpha_beta_no_trans_layer_norm=lambda: gemm_then("LayerNormalization", alpha=0.5, beta=2.0),
                  gemm_beta_zero_instance_norm=lambda: gemm_then("InstanceNormalization", beta=0.0))


@pytest.mark.parametrize("name", list(WRITE_BACK))
def test_write_back_puts_trained_weights_into_the_graph(name):
    """Every parameter moved (as training would), written back: the ONNX graph then computes what
    the module computes, and only initializer values changed."""
    model = prepare_for_onnx2torch(WRITE_BACK[name]())
    module = to_torch(model)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)) * 0.1 * (p.abs().mean() + 0.01))
    written = write_back(module, model)
    feeds = random_feeds(model)
    with torch.no_grad():
        got = module(*(torch.from_numpy(v) for v in feeds.values()))
    got = got if isinstance(got, (tuple, list)) else (got,)
    for ours, ref in zip(run(written, feeds), got):
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(run(model, feeds)[0], got[0].numpy(), atol=1e-4)  # the weights did move
    changed = [(a.name, b) for a, b in zip(model.graph.node, written.graph.node) if a != b]
    # only a Gemm whose beta was 0 changes: C now holds what its bias learned, with beta 1
    assert [(name, node_attrs(node)["beta"]) for name, node in changed] == ([("fc", 1.0)] if "beta_zero" in name else [])


def test_write_back_refuses_a_parameter_it_cannot_place():
    model = prepare_for_onnx2torch(digit_cnn())
    module = to_torch(model)
    module.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(OnnxLowrankError, match="cannot put the trained stray"):
        write_back(module, model)
