"""BatchNormalization and constant Mul/Add after a Conv or Gemm fold into its weight and bias."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, rel_err, run, tensor
from onnx import helper

from onnx_lowrank.graph import find_targets, prepare


def conv_then(rng, ops, conv_bias=True, extra_consumer=False):
    nodes = [helper.make_node("Conv", ["x", "W"] + (["B"] if conv_bias else []), ["c"], name="conv", pads=[1] * 4)]
    inits = [init("W", rng.standard_normal((6, 4, 3, 3)).astype(np.float32))]
    if conv_bias:
        inits.append(init("B", rng.standard_normal(6).astype(np.float32)))
    current = "c"
    for i, op in enumerate(ops):
        out = f"t{i}"
        if op == "bn":
            names = [f"bn{i}_{k}" for k in ("scale", "bias", "mean", "var")]
            values = [rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.5, 2, 6)]
            inits += [init(n, v.astype(np.float32)) for n, v in zip(names, values)]
            nodes.append(helper.make_node("BatchNormalization", [current] + names, [out], epsilon=1e-3))
        else:
            shape = {"mul": (1, 6, 1, 1), "add": (6, 1, 1), "mul_scalar": ()}[op]
            inits.append(init(f"k{i}", rng.standard_normal(shape).astype(np.float32)))
            kind = "Add" if op == "add" else "Mul"
            nodes.append(helper.make_node(kind, [f"k{i}", current] if i % 2 else [current, f"k{i}"], [out]))
        current = out
    outputs = [tensor(current, None)]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["side"]))
        outputs.append(tensor("side", None))
    return make_model(nodes, [tensor("x", [2, 4, 7, 7])], outputs, inits)


@pytest.mark.parametrize("ops", [["bn"], ["mul"], ["add"], ["bn", "mul_scalar", "add"], ["mul", "bn"]])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_folds_into_conv_and_keeps_outputs(ops, conv_bias):
    rng = np.random.default_rng(len(ops))
    model = conv_then(rng, ops, conv_bias)
    prepared = prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Conv"]
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    assert rel_err(run(prepared, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5
    (target,), _ = find_targets(prepared)
    adds_bias = conv_bias or any(op in ("bn", "add") for op in ops)
    assert (target.layer.bias is not None) == adds_bias


def test_conv_read_elsewhere_is_not_folded():
    rng = np.random.default_rng(0)
    prepared = prepare(conv_then(rng, ["bn"], extra_consumer=True))
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "BatchNormalization", "Relu"]


def test_batchnorm_folds_into_gemm_with_beta():
    rng = np.random.default_rng(0)
    names = ["s", "b", "m", "v"]
    values = [rng.standard_normal((5, 8)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5),
              rng.standard_normal(5), rng.uniform(0.5, 2, 5)]
    inits = [init(n, v.astype(np.float32)) for n, v in zip(["B", "C"] + names, values)]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("BatchNormalization", ["g"] + names, ["y"])]
    model = make_model(nodes, [tensor("x", [3, 8])], [tensor("y", None)], inits)
    prepared = prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Gemm"]
    x = rng.standard_normal((3, 8)).astype(np.float32)
    assert rel_err(run(prepared, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_prepare_does_not_touch_its_input():
    model = conv_then(np.random.default_rng(0), ["bn"])
    before = model.SerializeToString()
    prepare(model)
    assert model.SerializeToString() == before
