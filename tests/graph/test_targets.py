"""Target discovery: what is taken, and the reason for what is not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import compress, conv_model, init, make_model, rel_err, run, tensor
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph import find_targets, prepare

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)


def only_skip(model):
    targets, skipped = find_targets(prepare(model))
    assert not targets
    (skip,) = skipped
    return skip.reason


def test_weight_in_a_constant_node_is_a_target_and_rewrites_exactly():
    model = conv_model(W, input_shape=(1, 4, 8, 8), pads=[1] * 4, weight_in_constant_node=True)
    out = compress(model, "tucker2")
    assert "Constant" not in [n.op_type for n in out.graph.node]
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_weight_that_is_a_graph_input_is_skipped():
    model = conv_model(W, input_shape=(1, 4, 8, 8))
    model.graph.input.append(tensor("W", list(W.shape)))  # IR < 4 style: an overridable initializer
    assert only_skip(model) == "weight is a graph input (it can be fed at run time)"


def test_shared_weight_is_skipped():
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["x", "W"], ["b"], name="c2", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("a", None), tensor("b", None)], [init("W", W)])
    targets, skipped = find_targets(prepare(model))
    assert not targets and [s.reason for s in skipped] == ["weight is shared with another node or a subgraph"] * 2


def test_computed_weight_is_skipped():
    nodes = [helper.make_node("Relu", ["w_in"], ["W"]), helper.make_node("Conv", ["x", "W"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8]), tensor("w_in", list(W.shape))], [tensor("y", None)])
    assert only_skip(model) == "weight is not a constant"


def test_qdq_layer_is_skipped():
    q = np.round(W * 10).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
             helper.make_node("Conv", ["x", "W"], ["y"], name="qconv")]
    inits = [init("Wq", q), init("s", np.array(0.1, np.float32)), init("z", np.array(0, np.int8))]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", None)], inits)
    assert only_skip(model).startswith("quantized (QDQ) layer")


@pytest.mark.parametrize("case,reason", [
    ("both-constant", "both inputs are constant"),
    ("no-constant", "no constant weight"),
    ("3d-weight", "weight has 3 dims"),
])
def test_matmul_skips(case, reason):
    w3 = RNG.standard_normal((2, 6, 5)).astype(np.float32)
    if case == "both-constant":
        nodes = [helper.make_node("MatMul", ["A", "B"], ["y"])]
        inputs, inits = [], [init("A", np.ones((3, 6), np.float32)), init("B", np.ones((6, 5), np.float32))]
    elif case == "no-constant":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inputs, inits = [tensor("x", [3, 6]), tensor("w", [6, 5])], []
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
        inputs, inits = [tensor("x", [2, 3, 6])], [init("W", w3)]
    model = make_model(nodes, inputs or [tensor("dummy", [1])], [tensor("y", None)], inits)
    assert only_skip(model).startswith(reason)


def test_gemm_with_per_row_c_is_skipped():
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"])
    model = make_model([node], [tensor("x", [3, 6])], [tensor("y", None)],
                       [init("B", np.ones((6, 5), np.float32)), init("C", np.ones((3, 5), np.float32))])
    assert only_skip(model) == "Gemm's C varies per row: it is not a bias"


def test_nan_weight_is_skipped():
    bad = W.copy()
    bad[0, 0, 0, 0] = np.nan
    assert only_skip(conv_model(bad, input_shape=(1, 4, 8, 8))) == "weight contains NaN or Inf"


def test_layers_inside_subgraphs_are_left_alone():
    then_conv = helper.make_node("Conv", ["x", "Wi"], ["t"], pads=[1] * 4)
    then_graph = helper.make_graph([then_conv], "then", [], [tensor("t", None)],
                                   [numpy_helper.from_array(W, "Wi")])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor("e", None)])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="outer", pads=[1] * 4),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8]), tensor("flag", [], TensorProto.BOOL)],
                       [tensor("c", None), tensor("y", None)], [init("W", W)])
    targets, skipped = find_targets(prepare(model))
    assert [t.name for t in targets] == ["outer"] and not skipped


def test_float16_weights_are_factored_and_written_back_as_float16():
    model = conv_model(W.astype(np.float16), input_shape=(1, 4, 8, 8), pads=[1] * 4)
    out = compress(model, "svd")
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float16)
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 3e-3  # float16 precision
