"""Feature capture: the patches a layer's weight multiplies, and the statistics kept of them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, init, make_model, run, tensor
from onnx import helper

from onnx_lowrank.calibration.capture import capture, patches
from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.graph import find_targets, prepare
from onnx_lowrank.graph.downstream import with_outputs


@pytest.mark.parametrize("attrs", [
    dict(pads=[1, 1, 1, 1]),
    dict(strides=[2, 1], pads=[0, 2, 1, 0], dilations=[1, 2]),
    dict(group=2, pads=[1, 0, 1, 0]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
])
def test_conv_patches_times_weight_is_the_conv(attrs):
    rng = np.random.default_rng(0)
    groups = attrs.get("group", 1)
    weight = rng.standard_normal((6, 4 // groups, 3, 3)).astype(np.float32)
    model = conv_model(weight, input_shape=(2, 4, 9, 8), **attrs)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    (y,) = run(model, {"x": x})
    (target,), _ = find_targets(prepare(model))
    rows = patches(x, target.layer, rng, max_rows=10**9)  # every position, in order
    w = weight.reshape(groups, 6 // groups, -1).astype(np.float64)
    out = np.einsum("rgd,gtd->rgt", rows, w).reshape(2, y.shape[2], y.shape[3], 6)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), y, rtol=1e-4, atol=1e-4)


def test_left_matmul_rows_are_columns_even_when_square():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["W", "x"], ["y"])], [tensor("x", [2, 6, 6])],
                       [tensor("y", None)], [init("W", w)])
    (target,), _ = find_targets(prepare(model))
    x = rng.standard_normal((2, 6, 6)).astype(np.float32)
    rows = patches(x, target.layer, rng, max_rows=10**9, columns=target.inputs_in_columns)
    np.testing.assert_allclose(rows[:, 0] @ w.T, np.moveaxis(run(model, {"x": x})[0], -1, -2).reshape(-1, 5),
                               rtol=1e-4, atol=1e-4)


def test_statistics_are_exact_when_every_row_fits_and_bounded_otherwise():
    rng = np.random.default_rng(2)
    model = prepare(conv_model(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), input_shape=("N", 3, 8, 8),
                               pads=[1] * 4))
    (target,), _ = find_targets(model)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    stats, (outputs,) = capture(model, [target], CalibrationSet({"x": x}), batch_size=4, keep=50)
    s = stats[target.name]
    all_rows = patches(x, target.layer, rng, 10**9)[:, 0]
    assert s.rows == len(all_rows) == 640  # 10 images x 64 positions, under the sampling budget
    np.testing.assert_allclose(s.second_moment(shrink=False), all_rows.T @ all_rows / 640, rtol=1e-5, atol=1e-6)
    assert s.sample.shape == (50, 1, 27)  # a bounded sample, whatever the set's size
    assert outputs.shape == (10, 6, 8, 8)


class _Reader:
    """A PassReader that keeps what it is handed: per part, the samples' first input and a tensor."""

    def __init__(self, parts: list[np.ndarray], reads: list[str]):
        self.parts, self.reads, self.seen, self.planned = parts, reads, {}, None

    def plan(self, batch, measured) -> None:
        self.planned = (batch, measured)

    def visit(self, part, values, count, mask) -> None:
        self.seen.setdefault(part, []).append((values["x"][:count], values[self.reads[0]][:count]))


def test_a_reader_gets_its_parts_in_the_same_pass_and_the_outputs_keep_the_sets_order():
    """Compensation reads the original layers' outputs in the statistics' pass: its parts run
    first, each in runs of its own, with what it reads; the statistics still see every sample
    once, and the outputs come back in the set's order."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    model = prepare(make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", None)],
                               [init("W1", rng.standard_normal((5, 3, 3, 3)).astype(np.float32)),
                                init("W2", rng.standard_normal((4, 5, 3, 3)).astype(np.float32))]))
    targets, _ = find_targets(model)
    x = rng.standard_normal((23, 3, 6, 6)).astype(np.float32)
    data = CalibrationSet({"x": x})
    parts = [np.array([2, 5, 11, 17, 19]), np.array([0, 7, 8])]
    reader = _Reader(parts, ["h"])
    stats, (outputs,) = capture(model, targets, data, batch_size=4, reader=reader)
    np.testing.assert_allclose(outputs, run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    for k, part in enumerate(parts):
        runs = reader.seen[k]
        assert [len(r) for r, _ in runs] == [min(4, len(part) - i) for i in range(0, len(part), 4)]
        np.testing.assert_array_equal(np.concatenate([r for r, _ in runs]), x[part])
        h = np.concatenate([v for _, v in runs])
        np.testing.assert_allclose(h, run(with_outputs(model, ["h"]), {"x": x[part]})[1], rtol=1e-5, atol=1e-5)
    assert all(s.rows == 23 * 36 for s in stats.values())  # every sample's 36 positions, once
