"""Must-show 1: at full rank, every method's rewritten model computes what the original does,
through onnxruntime, to a relative error of 1e-5 in float32 — over the matrix of conv geometries,
Gemm and MatMul forms, and a hypothesis property test over random shapes and attributes."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import onnx
import pytest
from helpers import FULL, compress, conv_model, init, make_model, method_name, rel_err, run, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnx_lowrank.decompositions import Layer, decompose, reason_not_applicable
from onnx_lowrank.errors import UnsupportedLayer
from onnx_lowrank.graph import find_targets, prepare, replace_layers

TOL = 1e-5
KERNELS = [(1, 1), (3, 3), (5, 5), (3, 1), (1, 3)]
PADDINGS = ["symmetric", "asymmetric", "SAME_UPPER", "SAME_LOWER", "VALID"]


def padding_attrs(padding: str, kernel) -> dict:
    if padding == "symmetric":
        return {"pads": [k // 2 for k in kernel] * 2}
    if padding == "asymmetric":
        return {"pads": [k // 2 for k in kernel] + [k // 2 + 1 for k in kernel]}
    return {"auto_pad": padding}


def expected_decline(key: str, kernel, groups: int, in_per_group: int) -> bool:
    """The rules a method must follow: these combinations are declined with a reason."""
    one_by_one = all(k == 1 for k in kernel)
    spatial = len(kernel)
    if groups > 1 and in_per_group == 1:
        return True
    if key in ("tucker2", "cp", "cp4", "tucker2-cp") and one_by_one:
        return True
    if key in ("spatial-svd", "tt", "tr", "cp4") and spatial != 2:
        return True
    return key == "tr" and groups > 1


def check_conv(key, kernel, strides, padding, dilations, groups, bias, seed, spatial_size=None):
    rng = np.random.default_rng(seed)
    ndim = len(kernel)
    c_in, c_out = 2 * groups, 3 * groups
    weight = rng.standard_normal((c_out, c_in // groups) + tuple(kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if bias else None
    size = spatial_size or {1: (11,), 2: (12, 11), 3: (8, 7, 6)}[ndim]
    model = conv_model(weight, b, input_shape=(2, c_in) + tuple(size), strides=strides,
                       dilations=dilations, group=groups, **padding_attrs(padding, kernel))
    x = rng.standard_normal((2, c_in) + tuple(size)).astype(np.float32)
    if expected_decline(key, kernel, groups, c_in // groups):
        target = find_targets(prepare(model))[0][0]
        reason = reason_not_applicable(target.layer, method_name(key), **FULL[key])
        assert reason, f"{key} should decline {kernel} groups={groups}"
        with pytest.raises(UnsupportedLayer, match=method_name(key)):
            decompose(target.layer, method_name(key), **FULL[key])
        return
    (ref,) = run(model, {"x": x})
    (got,) = run(compress(model, key), {"x": x})
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL


CONV2D_CASES = []
for i, (kernel, stride, padding) in enumerate(itertools.product(KERNELS, (1, 2), PADDINGS)):
    # onnxruntime rejects dilation with SAME auto_pad (in the original model too): no reference
    dilation = 2 if i % 3 == 0 and not padding.startswith("SAME") else 1
    groups = 2 if i % 4 == 1 else 1
    CONV2D_CASES.append((kernel, (stride, stride if i % 2 else 1), padding, (dilation, dilation), groups, i % 2 == 0))


@pytest.mark.parametrize("key", list(FULL))
@pytest.mark.parametrize("kernel,strides,padding,dilations,groups,bias", CONV2D_CASES)
def test_conv2d_full_rank_is_exact(key, kernel, strides, padding, dilations, groups, bias):
    seed = zlib.crc32(repr((key, kernel, strides, padding)).encode())
    check_conv(key, kernel, strides, padding, dilations, groups, bias, seed)


CONV_ND_CASES = [
    ((3,), (1,), "symmetric", (1,), 1, True),
    ((5,), (2,), "asymmetric", (2,), 1, False),
    ((3,), (2,), "SAME_UPPER", (1,), 2, True),
    ((1,), (1,), "VALID", (1,), 1, True),
    ((3, 3, 3), (1, 1, 1), "symmetric", (1, 1, 1), 1, True),
    ((3, 1, 3), (2, 1, 2), "asymmetric", (1, 2, 1), 1, False),
    ((3, 3, 3), (2, 2, 2), "SAME_LOWER", (1, 1, 1), 2, True),  # SAME: dilation 1, as above
]


@pytest.mark.parametrize("key", list(FULL))
@pytest.mark.parametrize("kernel,strides,padding,dilations,groups,bias", CONV_ND_CASES)
def test_conv1d_conv3d_full_rank_is_exact(key, kernel, strides, padding, dilations, groups, bias):
    check_conv(key, kernel, strides, padding, dilations, groups, bias, seed=7)


@pytest.mark.parametrize("key", list(FULL))
def test_depthwise_conv_is_declined(key):
    check_conv(key, (3, 3), (1, 1), "symmetric", (1, 1), 4, True, seed=1)


@pytest.mark.parametrize("key", ["svd", "spatial-svd", "tucker2", "cp", "tt", "tr"])
def test_same_padding_with_unknown_input_size_keeps_auto_pad(key):
    """With symbolic H/W the SAME padding cannot be resolved; it is carried onto the chain's
    spatial convs, per axis, and stays exact at any input size."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    model = conv_model(weight, None, input_shape=("N", 4, "H", "W"), strides=(2, 2), auto_pad="SAME_UPPER")
    compressed = compress(model, key)
    for h, w in ((9, 8), (12, 5)):
        x = rng.standard_normal((2, 4, h, w)).astype(np.float32)
        assert rel_err(run(compressed, {"x": x})[0], run(model, {"x": x})[0]) <= TOL


# ---- Gemm and MatMul -----------------------------------------------------------------------

def gemm_model(rng, trans_a, trans_b, alpha, beta, c_kind, m=5, k=7, n=6):
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("B", b)]
    inputs = [tensor("a", [k, m] if trans_a else [m, k])]
    names = ["a", "B"]
    if c_kind == "vector":
        inits.append(init("C", rng.standard_normal(n).astype(np.float32)))
        names.append("C")
    elif c_kind == "scalar":
        inits.append(init("C", np.array([0.7], dtype=np.float32)))
        names.append("C")
    elif c_kind == "input":
        inputs.append(tensor("c", [m, n]))
        names.append("c")
    node = helper.make_node("Gemm", names, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], inputs, [tensor("y", None)], inits)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c_kind", ["none", "vector", "scalar", "input"])
def test_gemm_full_rank_is_exact(trans_a, trans_b, c_kind):
    rng = np.random.default_rng(trans_a * 2 + trans_b)
    model = gemm_model(rng, trans_a, trans_b, alpha=0.5, beta=1.5, c_kind=c_kind)
    feeds = {"a": rng.standard_normal((7, 5) if trans_a else (5, 7)).astype(np.float32)}
    if c_kind == "input":
        feeds["c"] = rng.standard_normal((5, 6)).astype(np.float32)
    (ref,) = run(model, feeds)
    (got,) = run(compress(model, "svd"), feeds)
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("key", [k for k in FULL if k != "svd"])
def test_conv_methods_decline_dense_layers(key):
    layer = Layer(np.ones((4, 3)))
    assert "svd" in reason_not_applicable(layer, method_name(key), **FULL[key])


def matmul_model(rng, input_shape, side="right", bias=False, k=6, n=5):
    w = rng.standard_normal((k, n) if side == "right" else (n, k)).astype(np.float32)
    names = ["x", "W"] if side == "right" else ["W", "x"]
    nodes = [helper.make_node("MatMul", names, ["h" if bias else "y"], name="dense")]
    inits = [init("W", w)]
    if bias:
        inits.append(init("bias", rng.standard_normal(n).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["h", "bias"], ["y"], name="dense_bias"))
    return make_model(nodes, [tensor("x", list(input_shape))], [tensor("y", None)], inits)


@pytest.mark.parametrize("input_shape,side,bias", [
    ((4, 6), "right", False),
    ((2, 3, 6), "right", False),       # batched 3-D activations, as in transformers
    (("batch", "seq", 6), "right", True),  # Keras/TF dense: MatMul + Add(bias)
    ((4, 6), "right", True),
    ((2, 6, 3), "left", False),        # W @ X
])
def test_matmul_full_rank_is_exact(input_shape, side, bias):
    rng = np.random.default_rng(11)
    model = matmul_model(rng, input_shape, side, bias)
    concrete = [d if isinstance(d, int) else 3 for d in input_shape]
    x = rng.standard_normal(concrete).astype(np.float32)
    compressed = compress(model, "svd")
    if bias:
        ops = [n.op_type for n in compressed.graph.node]
        assert ops == ["MatMul", "MatMul", "Add"]  # the bias Add is part of the dense layer
    assert rel_err(run(compressed, {"x": x})[0], run(model, {"x": x})[0]) <= TOL


def test_output_name_and_derived_names():
    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), input_shape=(1, 4, 8, 8), pads=[1] * 4)
    out = compress(model, "tucker2")
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.node[-1].output[0] == "y"
    assert all(n.name.startswith("conv/lowrank/") for n in out.graph.node)
    assert {t.name for t in out.graph.initializer}.isdisjoint({"W"})  # the old weight is gone


def _step_output(model, step, x_name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a chain's last step computes from its input as the map describes it (Z W^T + b over
    the rows), and what the written model computes there, as (rows, out)."""
    from onnx_lowrank.calibration.capture import row_count, rows_at
    from onnx_lowrank.graph.downstream import with_outputs

    node = next(n for n in model.graph.node if n.name == step.node)
    output = node.output[0]
    if step.bias is not None and node.op_type == "MatMul":  # the Add after it holds the bias
        output = next(n.output[0] for n in model.graph.node if step.bias in n.input)
    augmented = with_outputs(model, [step.input, output])
    values = dict(zip([o.name for o in augmented.graph.output], run(augmented, {x_name: x})))
    z, y = values[step.input], values[output]
    stored = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == step.weight))
    w = stored.T if step.transposed else stored.reshape(len(stored), -1)
    np.testing.assert_allclose(w, step.layer.weight.reshape(len(step.layer.weight), -1), rtol=1e-6, atol=1e-7)
    rows = rows_at(z, step.layer, np.arange(row_count(z, step.layer)))[:, 0].astype(np.float64)
    want = rows @ w.T.astype(np.float64)
    if step.bias is not None:
        want += numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == step.bias))
    got = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if step.layer.is_conv else y.reshape(-1, y.shape[-1])
    return want, got


@pytest.mark.parametrize("key", list(FULL))
def test_the_chain_map_says_what_was_written(key):
    """Each chain's nodes are in the model, and its last step, computed as the map describes it
    from the tensor it names, is what the model computes (compensation refits it so)."""
    rng = np.random.default_rng(5)
    model = conv_model(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32),
                       input_shape=(2, 4, 9, 9), pads=[1, 0, 1, 2], strides=[2, 1])
    prepared = prepare(model)
    targets, _ = find_targets(prepared)
    rewritten = replace_layers(prepared, [(t, decompose(t.layer, method_name(key), **FULL[key])) for t in targets])
    (chain,) = rewritten.chains.values()
    assert set(chain.nodes) == {n.name for n in rewritten.model.graph.node}
    last = rewritten.model.graph.node[-1]
    if last.op_type == "Reshape":  # a ring's chain ends in one: no linear last step
        assert chain.last is None
        return
    assert chain.last.node == last.name
    want, got = _step_output(rewritten.model, chain.last, "x", rng.standard_normal((2, 4, 9, 9)).astype(np.float32))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("form", ["gemm", "matmul", "matmul+add"])
def test_the_chain_map_of_a_dense_layer(form):
    rng = np.random.default_rng(6)
    if form == "gemm":
        model, x_name = gemm_model(rng, 0, 1, alpha=1.0, beta=1.0, c_kind="vector"), "a"
        x = rng.standard_normal((5, 7)).astype(np.float32)
    else:
        model, x_name = matmul_model(rng, (2, 3, 6), bias=form == "matmul+add"), "x"
        x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    prepared = prepare(model)
    targets, _ = find_targets(prepared)
    rewritten = replace_layers(prepared, [(t, decompose(t.layer, "svd", rank=2)) for t in targets])
    (chain,) = rewritten.chains.values()
    assert (chain.last.bias is not None) == (form != "matmul")
    want, got = _step_output(rewritten.model, chain.last, x_name, x)
    assert rel_err(got, want) <= TOL


def test_rewritten_model_is_loadable_when_onnx_writes_a_newer_ir():
    """onnx may write an IR version newer than onnxruntime reads; the rewrite lowers it."""
    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), input_shape=(1, 4, 8, 8))
    model.ir_version = onnx.IR_VERSION
    out = compress(model, "svd")
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert run(out, {"x": x})[0].shape == (1, 6, 6, 6)


# ---- property test ---------------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    ndim = draw(st.sampled_from([1, 2, 2, 2, 3]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 4))
    c_out = groups * draw(st.integers(1, 4))
    padding = draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if padding.startswith("SAME"):
        dilations = (1,) * ndim  # onnxruntime rejects dilation with SAME auto_pad
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * ndim)) if padding == "explicit" else None
    size = tuple(draw(st.integers(dilations[i] * (kernel[i] - 1) + 1, 10)) for i in range(ndim))
    method = draw(st.sampled_from(list(FULL)))
    return dict(ndim=ndim, kernel=kernel, strides=strides, dilations=dilations, groups=groups,
                c_in=c_in, c_out=c_out, padding=padding, pads=pads, size=size, method=method,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=250)
@given(conv_cases())
def test_property_full_rank_is_exact_or_declined(case):
    rng = np.random.default_rng(case["seed"])
    weight = rng.standard_normal((case["c_out"], case["c_in"] // case["groups"]) + case["kernel"]).astype(np.float32)
    bias = rng.standard_normal(case["c_out"]).astype(np.float32) if case["bias"] else None
    attrs = {"pads": case["pads"]} if case["padding"] == "explicit" else {"auto_pad": case["padding"]}
    model = conv_model(weight, bias, input_shape=(1, case["c_in"]) + case["size"], strides=case["strides"],
                       dilations=case["dilations"], group=case["groups"], **attrs)
    key = case["method"]
    target = find_targets(prepare(model))[0][0]
    reason = reason_not_applicable(target.layer, method_name(key), **FULL[key])
    assert bool(reason) == expected_decline(key, case["kernel"], case["groups"], case["c_in"] // case["groups"])
    if reason:
        return
    x = rng.standard_normal((1, case["c_in"]) + case["size"]).astype(np.float32)
    (ref,) = run(model, {"x": x})
    (got,) = run(compress(model, key), {"x": x})
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL

