"""graph/outputs.py: which axis of an output holds the channels, and which channels one layer
wrote, read from the graph by walking back to the layer that wrote them."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from helpers import init, make_model, tensor
from onnx_lowrank.graph.outputs import Layout, output_layouts


def _convs(*tail, out_shape, concat_axis=1):
    """Two Convs (3 and 5 channels) on one image, concatenated along `concat_axis`, then `tail`."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Conv", ["x", "wb"], ["b"])]
    inits = [init("wa", rng.standard_normal((3, 2, 1, 1)).astype(np.float32)),
             init("wb", rng.standard_normal((5 if concat_axis == 1 else 3, 2, 1, 1)).astype(np.float32))]
    nodes.append(helper.make_node("Concat", ["a", "b"], ["c"], axis=concat_axis))
    nodes += tail
    return make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor(nodes[-1].output[0], out_shape)], inits)


def test_layers_joined_along_the_channel_axis_keep_their_spans():
    model = _convs(helper.make_node("Sigmoid", ["c"], ["y"]), out_shape=[1, 8, 4, 4])
    assert output_layouts(model) == [Layout(1, ((0, 3), (3, 8)), 4)]


def test_a_transpose_moves_the_channel_axis():
    model = _convs(helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1]), out_shape=[1, 4, 4, 8])
    assert output_layouts(model) == [Layout(3, ((0, 3), (3, 8)), 4)]


def test_a_concat_along_another_axis_keeps_the_common_layout():
    model = _convs(out_shape=[1, 3, 8, 4], concat_axis=2)
    assert output_layouts(model) == [Layout(1, ((0, 3),), 4)]


def test_a_reshape_is_not_followed():
    tail = [helper.make_node("Reshape", ["c", "shape"], ["y"])]
    model = _convs(*tail, out_shape=[1, 8, 16])
    model.graph.initializer.append(init("shape", np.array([1, 8, 16], np.int64)))
    assert output_layouts(model) == [None]


def test_dense_layers_write_the_last_axis():
    rng = np.random.default_rng(1)
    inits = [init("w", rng.standard_normal((6, 4)).astype(np.float32)),
             init("g", rng.standard_normal((6, 3)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["seq"]), helper.make_node("Relu", ["seq"], ["act"]),
             helper.make_node("Gemm", ["flat", "g"], ["vec"])]
    model = make_model(nodes, [tensor("x", ["n", 7, 6]), tensor("flat", ["n", 6])],
                       [tensor("act", ["n", 7, 4]), helper.make_tensor_value_info("vec", TensorProto.FLOAT, ["n", 3])],
                       inits)
    assert output_layouts(model) == [Layout(2, ((0, 4),), 3), Layout(1, ((0, 3),), 2)]


def test_a_squeeze_moves_the_channel_axis_or_leaves_one_channel():
    """basic-pitch writes its one-channel note maps (N, 1, T, F) as (N, T, F): one channel; a
    squeeze of another axis of size 1 keeps the channels, at their new place."""
    rng = np.random.default_rng(2)

    def squeezed(channels, height, out_shape):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["y"])]
        inits = [init("w", rng.standard_normal((channels, 2, 1, 1)).astype(np.float32)),
                 init("shape", np.array([-1, *out_shape[1:]], np.int64))]
        return make_model(nodes, [tensor("x", ["n", 2, height, 4])], [tensor("y", out_shape)], inits)

    assert output_layouts(squeezed(1, 5, ["n", 5, 4])) == [Layout(None, None, 3)]
    assert output_layouts(squeezed(3, 1, ["n", 3, 4])) == [Layout(1, ((0, 3),), 3)]
    assert output_layouts(squeezed(3, 5, ["n", 15, 4])) == [None]  # channels and rows merged
