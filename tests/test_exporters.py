"""Exporter-shaped models (tests/exporter_models.py: the trained MNIST CNN as tf2onnx, Keras,
PyTorch legacy/dynamo and other exporters write it) convert, and the written file stays within eps
on the calibration samples, measured here again in onnxruntime."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import exporter_models as em
from helpers import MODELS, mnist_test_images, run
from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.metrics.quality import quality
from onnx_lowrank.pipeline import compress, compress_file

EPS = 0.01
SAMPLES = 300


@pytest.fixture(scope="module")
def net():
    return em.trained_net()


@pytest.fixture(scope="module")
def images():
    return mnist_test_images(SAMPLES)


def feeds_for(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The images in the layout and dtype the model's input wants (and a prior, when it has one)."""
    feeds = {}
    for inp in model.graph.input:
        elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if inp.name == "prior":
            feeds[inp.name] = (0.1 * np.random.default_rng(0).standard_normal((len(x), 10))).astype(elem)
        elif inp.type.tensor_type.shape.dim[-1].dim_value == 1:  # NHWC
            feeds[inp.name] = x.transpose(0, 2, 3, 1).astype(elem)
        else:
            feeds[inp.name] = x.astype(elem)
    return feeds


def convert(model: onnx.ModelProto, images, tmp_path, external_data: bool = False):
    """Write `model`, convert it within EPS, and check what every conversion must give: the same
    interface, fewer MACs, and a drop within EPS that this test measures again itself."""
    x, y = images
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    if external_data:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving as external data moves the tensors out of the proto itself
        onnx.save_model(copy, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(src))
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    feeds = feeds_for(model, x)
    classifier = len(model.graph.output) == 1
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds, **({"labels": y} if classifier else {}))
    config = CompressConfig(eps=EPS)
    report = compress_file(src, dst, config, str(calib), "labels" if classifier else None)

    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir() if p.name in digests} == digests
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    for a, b in ((model.graph.input, out.graph.input), (model.graph.output, out.graph.output)):
        assert [(v.name, v.type.tensor_type.elem_type) for v in a] == [(v.name, v.type.tensor_type.elem_type) for v in b]
    assert report.macs_after < report.macs_before

    # the drop the converter decided on (its held-out part, drawn as the converter draws it), run
    # through both files here; its bound within eps
    assert report.metric == ("accuracy" if classifier else "r2")
    labels = y if classifier else None
    _, held = CalibrationSet(feeds, labels).split(config.holdout, config.seed)
    held_drop = quality(report.metric, run(model, held.inputs), run(out, held.inputs), held.labels).drop
    assert held_drop == pytest.approx(report.drop, abs=1e-6) and report.bound <= EPS
    return out, report


def subgraph_nodes(node: onnx.NodeProto) -> list[list[onnx.NodeProto]]:
    """The nodes of a node's subgraphs (shape inference may add value_info there; that is all)."""
    return [list(a.g.node) for a in node.attribute if a.HasField("g")]


@pytest.mark.parametrize("opset,dynamo", [(9, False), (11, False), (13, False), (17, False), (18, True), (21, True)],
                         ids=["legacy-9", "legacy-11", "legacy-13", "legacy-17", "dynamo-18", "dynamo-21"])
def test_pytorch_exports(net, images, tmp_path, opset, dynamo):
    model = em.pytorch(net, opset, dynamo)
    out, report = convert(model, images, tmp_path)
    assert out.opset_import[0].version == opset  # the chains use only ops the model's opset has
    assert not report.skipped
    if opset < 11:  # Gemm's C is required there: the factored head's first Gemm gets a zero one
        np.savez(tmp_path / "fixed.npz", **feeds_for(model, images[0]))  # at fixed ranks: every layer factored
        out, _ = compress(model, CompressConfig(select="rank", ratio=0.5), calibration=tmp_path / "fixed.npz")
        factored = [n for n in out.graph.node if n.op_type == "Gemm" and "lowrank" in n.name]
        assert factored and all(len(n.input) == 3 for n in factored)


def test_tf2onnx_nhwc_with_keras_dense(net, images, tmp_path):
    model = em.tf2onnx_nhwc(net)
    out, _ = convert(model, images, tmp_path)
    np.savez(tmp_path / "fixed.npz", **feeds_for(model, images[0]))  # at fixed ranks: every layer factored
    out, report = compress(model, CompressConfig(select="rank", ratio=0.5), calibration=tmp_path / "fixed.npz")
    rewritten = {layer.name for layer in report.layers if layer.method is not None}
    assert "model/dense/MatMul" in rewritten  # MatMul + Add(bias) is one dense layer
    # the NHWC transposes around every conv are still there, the convs between them factored
    assert sum(n.op_type == "Transpose" for n in out.graph.node) == sum(n.op_type == "Transpose" for n in model.graph.node)
    assert any(name.endswith("/Conv2D") for name in rewritten)


def test_weights_in_constant_nodes(net, images, tmp_path):
    model = em.constant_nodes(net)
    assert not model.graph.initializer
    out, report = convert(model, images, tmp_path)
    assert not report.skipped
    rewritten = [layer.name for layer in report.layers if layer.method is not None]
    assert rewritten
    # the factored weights' old Constant nodes are gone, not left dangling
    constants = {n.output[0] for n in out.graph.node if n.op_type == "Constant"}
    used = {i for n in out.graph.node for i in n.input}
    assert constants <= used


def test_dynamic_batch_height_width(net, images, tmp_path):
    model = em.dynamic_hw(net)
    out, _ = convert(model, images, tmp_path)
    dims = [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]


def test_external_data(net, images, tmp_path):
    out, _ = convert(em.pytorch(net, 17), images, tmp_path, external_data=True)
    assert (tmp_path / "in.onnx.data").exists()
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)


@pytest.mark.parametrize("keep_io_types", [True, False], ids=["float32-io", "float16-io"])
def test_float16(net, images, tmp_path, keep_io_types):
    out, report = convert(em.float16(net, keep_io_types), images, tmp_path)
    floats = [t for t in out.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)


def test_several_inputs_and_outputs_and_a_conv_with_two_consumers(net, images, tmp_path):
    """The last block's conv2 feeds the residual Add and a pooled graph output; `convert` checks
    all three outputs (cosine, the worst one counting) against the original."""
    model = em.multi_io(net)
    out, report = convert(model, images, tmp_path)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert {n.op_type for n in out.graph.node} >= {"GlobalAveragePool", "Add"}


def test_concat_blocks(net, images, tmp_path):
    out, report = convert(em.concat_blocks(net), images, tmp_path)
    assert sum(n.op_type == "Concat" for n in out.graph.node) == 3


def test_if_subgraph_left_alone(net, images, tmp_path):
    model = em.if_head(net)
    out, report = convert(model, images, tmp_path)
    (before,), (after,) = ([n for n in m.graph.node if n.op_type == "If"] for m in (model, out))
    assert subgraph_nodes(before) == subgraph_nodes(after)  # the branches, untouched
    outer = {t.name: t for t in out.graph.initializer}
    for name in ("head.1.weight", "head.4.weight", "blocks.0.shortcut.weight"):
        assert name in outer  # still there for the branches to read
    shared = [s for s in report.skipped if s["name"] == "blocks.0.shortcut/Conv"]
    assert shared and "shared" in shared[0]["reason"]


def test_loop_body_left_alone(net, images, tmp_path):
    model = em.loop_block(net)
    out, report = convert(model, images, tmp_path)
    loop = [n for n in out.graph.node if n.op_type == "Loop"]
    assert len(loop) == 1 and subgraph_nodes(loop[0]) == subgraph_nodes([n for n in model.graph.node if n.op_type == "Loop"][0])
    weight = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["loop.conv.weight"]
    assert weight.shape == (64, 32, 3, 3)


def test_qdq_layers_skipped_with_the_reason(net, images, tmp_path):
    model = em.qdq(net)
    out, report = convert(model, images, tmp_path)
    convs = [s for s in report.skipped if s["op_type"] == "Conv"]
    assert len(convs) == 10 and all("quantized (QDQ)" in s["reason"] for s in convs)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == sum(
        n.op_type == "DequantizeLinear" for n in model.graph.node)
    def count(kinds):
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in kinds)
    # quantized weights (and their zero points) count as parameters
    assert count({onnx.TensorProto.INT8}) > 0
    assert report.params_before == count({onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8})
    # the float head is what was factored
    assert {layer.name for layer in report.layers if layer.method is not None} <= {"head.1/Gemm", "head.4/Gemm"}


def test_exporter_models_compute_the_trained_network(net, images):
    """The builders are right: every variant gives the original file's top-1 on real images."""
    x, _ = images
    reference = run(onnx.load(str(MODELS / "mnist_cnn.onnx")), {"image": x})[0].argmax(1)
    variants = [em.pytorch(net, 11), em.pytorch(net, 21, dynamo=True), em.tf2onnx_nhwc(net), em.constant_nodes(net),
                em.dynamic_hw(net), em.float16(net, True), em.float16(net, False), em.multi_io(net),
                em.concat_blocks(net), em.if_head(net), em.loop_block(net), em.qdq(net)]
    for model in variants:
        top1 = run(model, feeds_for(model, x))[0].argmax(1)
        assert np.mean(top1 == reference) >= 0.98, model.graph.node[0].name
