"""Export touches: merged linear pairs, float16 weights and onnxruntime's offline optimization
compute what the model computed (float16 within its rounding), and merging only happens where
one layer costs fewer MACs than two."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, run, tensor
from onnx import helper

from onnx_lowrank.graph import node_costs
from onnx_lowrank.graph.export import fp16_weights, merge_linear_pairs
from onnx_lowrank.runtime.sessions import offline_optimized

RNG = np.random.default_rng(0)
WIDTHS = [16, 4, 16, 4, 16]  # x -> thin -> wide -> thin -> wide: only the wide middles can go


def chain(kind: str, relu_after: int | None = None) -> onnx.ModelProto:
    nodes, inits, current = [], [], "x"
    for i, (c, t) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        out = "y" if i == len(WIDTHS) - 2 else f"h{i}"
        w = RNG.normal(size=(t, c)).astype(np.float32)
        b = RNG.normal(size=t).astype(np.float32)
        if kind == "conv":
            inits += [init(f"W{i}", w.reshape(t, c, 1, 1)), init(f"B{i}", b)]
            nodes.append(helper.make_node("Conv", [current, f"W{i}", f"B{i}"], [out + "_" if i == relu_after else out],
                                          name=f"l{i}"))
        elif kind == "gemm":
            inits += [init(f"W{i}", w), init(f"B{i}", b)]
            nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [out + "_" if i == relu_after else out],
                                          name=f"l{i}", transB=1))
        else:
            inits.append(init(f"W{i}", w.T))
            nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out + "_" if i == relu_after else out],
                                          name=f"l{i}"))
        if i == relu_after:
            nodes.append(helper.make_node("Relu", [out + "_"], [out]))
        current = out
    shape = {"conv": ["N", 16, 5, 5], "gemm": ["N", 16], "matmul": ["N", 3, 16]}[kind]
    return make_model(nodes, [tensor("x", shape)], [tensor("y", None)], inits)


def inputs(kind: str) -> dict:
    shape = {"conv": (2, 16, 5, 5), "gemm": (2, 16), "matmul": (2, 3, 16)}[kind]
    return {"x": RNG.normal(size=shape).astype(np.float32)}


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_merge_takes_out_the_wide_middle_only(kind):
    model = chain(kind)
    merged, count = merge_linear_pairs(model)
    onnx.checker.check_model(merged, full_check=True)
    # (4 -> 16, 16 -> 4) becomes 4 -> 4, which then folds into the 16 -> 4 before it; the last
    # pair (16 -> 4, 4 -> 16) would cost more as one layer and stays
    assert count == 2
    assert len(merged.graph.node) == 2
    # a merged layer keeps the name of the one it replaced: chains and quantization units know it so
    assert [n.name for n in merged.graph.node] == ["l2", "l3"]
    feed = inputs(kind)
    np.testing.assert_allclose(run(merged, feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-4)
    shapes = {"x": tuple(feed["x"].shape[:0]) + (1,) + feed["x"].shape[1:]}
    assert sum(c.macs for c in node_costs(merged, shapes)) < sum(c.macs for c in node_costs(model, shapes))


def test_no_merge_across_an_activation():
    model = chain("conv", relu_after=1)  # the Relu sits between the pair that would merge
    merged, count = merge_linear_pairs(model)
    assert count == 0 and len(merged.graph.node) == len(model.graph.node)


def test_fp16_weights_halve_the_file_and_keep_the_outputs():
    model = chain("conv")
    half = fp16_weights(model)
    onnx.checker.check_model(half, full_check=True)
    def weight_bytes(m):
        return sum(len(t.raw_data) for t in m.graph.initializer)

    assert weight_bytes(half) < 0.55 * weight_bytes(model)  # vectors under 16 elements stay float32
    feed = inputs("conv")
    ref = run(model, feed)[0]
    np.testing.assert_allclose(run(half, feed)[0], ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_ort_optimized_computes_the_same():
    model = chain("gemm", relu_after=1)
    optimized = offline_optimized(model)
    onnx.checker.check_model(optimized, full_check=True)
    feed = inputs("gemm")
    np.testing.assert_allclose(run(optimized, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
