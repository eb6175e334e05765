"""The patterns of real exporters' files that broke the converter (the real-model issue), each as a
small model built here: sizes computed from the input (Shape -> Slice -> Concat -> Resize, as
`F.interpolate(size=x.shape[2:])` exports), inputs of a fixed batch, state and scalar inputs,
shapes onnx's inference cannot follow (paddle2onnx), and layers too wide to hold a full second
moment of their inputs; and the pieces of a graph the tool runs alone compute the shapes they
read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import init, make_model, tensor
from onnx_lowrank import cli
from onnx_lowrank.calibration.capture import capture
from onnx_lowrank.calibration.data import CalibrationSet, load_calibration
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.errors import OutOfMemory
from onnx_lowrank.graph import find_targets, node_costs, prepare
from onnx_lowrank.graph.downstream import downstream, downstream_model, pieces, with_outputs
from onnx_lowrank.pipeline import compress
from onnx_lowrank.runtime.sessions import costs_at, predict, session


def low_rank(rng, shape, rank):
    """A weight of the given rank over its first axis against the rest: there is something to find."""
    out, rest = shape[0], int(np.prod(shape[1:]))
    w = rng.standard_normal((out, rank)) @ rng.standard_normal((rank, rest)) / np.sqrt(rest)
    return (w + 0.01 * rng.standard_normal(w.shape)).reshape(shape).astype(np.float32)


def resize_model(rng) -> onnx.ModelProto:
    """A U-Net step: the upsampled branch is resized to the skip's size, computed from the skip at
    run time, and the two are joined (PyTorch's legacy export of F.interpolate(size=a.shape[2:]))."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["c2"], pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["b"]),
        helper.make_node("Shape", ["a"], ["sa"]),
        helper.make_node("Constant", [], ["s0"], value=helper.make_tensor("s0", TensorProto.INT64, [1], [2])),
        helper.make_node("Constant", [], ["s1"], value=helper.make_tensor("s1", TensorProto.INT64, [1], [4])),
        helper.make_node("Slice", ["sa", "s0", "s1"], ["hw"]),
        helper.make_node("Shape", ["b"], ["sb"]),
        helper.make_node("Constant", [], ["z0"], value=helper.make_tensor("z0", TensorProto.INT64, [1], [0])),
        helper.make_node("Slice", ["sb", "z0", "s0"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["b", "", "", "sizes"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["a", "up"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "W3", "B3"], ["y"], pads=[1] * 4),
    ]
    inits = [init("W1", low_rank(rng, (16, 3, 3, 3), 4)), init("B1", np.zeros(16, np.float32)),
             init("W2", low_rank(rng, (16, 16, 3, 3), 4)), init("B2", np.zeros(16, np.float32)),
             init("W3", low_rank(rng, (4, 32, 3, 3), 2)), init("B3", np.zeros(4, np.float32))]
    return make_model(nodes, [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", 4, "H", "W"])], inits)


def test_part_downstream_of_a_layer_computes_the_shapes_it_reads():
    """The sub-model run for a layer's sensitivity probe computes the Resize's sizes (and the
    Constant nodes they need) itself: fed at its frontier, onnxruntime refused to build it."""
    model = prepare(resize_model(np.random.default_rng(0)))
    conv2 = next(n for n in model.graph.node if n.output[0] == "c2")
    part = downstream(model.graph, conv2)
    ran = {model.graph.node[i].output[0] for i in part.nodes}
    assert {"sa", "s0", "s1", "hw", "sizes"} <= ran   # the skip's shape, computed in the part
    assert set(part.frontier) <= {"a", "c2"}       # data only: no shape or constant fed from outside
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 10)).astype(np.float32)
    values = dict(zip(part.frontier, session(with_outputs(model, part.frontier)).run(part.frontier, {"x": x})))
    sub = session(downstream_model(model, part, values))
    (y,) = sub.run(None, values)
    np.testing.assert_allclose(y, session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_pieces_compute_the_shapes_they_read_and_hand_on_the_data():
    """Compensation's pieces (compensation/refit.py) start from what earlier pieces computed; a shape an
    earlier piece computed (the Resize's sizes) is computed again inside, from the data it comes
    from, never fed; the data a later piece reads is among the earlier piece's outputs."""
    model = prepare(resize_model(np.random.default_rng(0)))
    first, second = pieces(model.graph, ["sizes", "cat"])
    assert first.outputs[0] == "sizes" and set(first.outputs[1:]) == {"a", "b"}
    ran = {o for i in second.nodes for o in model.graph.node[i].output}
    assert {"sizes", "up"} <= ran and set(second.frontier) == {"a", "b"}
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 10)).astype(np.float32)
    values = {"x": x}
    for piece in (first, second):
        sess = session(downstream_model(model, piece, values))
        values.update(zip(piece.outputs, sess.run(piece.outputs, {n: values[n] for n in piece.frontier})))
    np.testing.assert_allclose(values["cat"], session(with_outputs(model, ["cat"])).run(["cat"], {"x": x})[0],
                               rtol=1e-6)


def test_model_with_sizes_computed_from_the_input_converts():
    rng = np.random.default_rng(0)
    model = resize_model(rng)
    x = rng.standard_normal((60, 3, 16, 16)).astype(np.float32)
    out, report = compress(model, CompressConfig(eps=0.05, rank_multiple=1), calibration=_reader({"x": x}))
    assert report.mac_ratio > 1.2 and report.drop <= 0.05
    other = rng.standard_normal((2, 3, 24, 20)).astype(np.float32)  # H, W stay dynamic
    assert session(out).run(None, {"x": other})[0].shape == (2, 4, 24, 20)


def state_model(rng, batch: int, state: bool = True) -> onnx.ModelProto:
    """An image input of a fixed batch and (`state`) an RNN-style state [1, 1, 8] and a scalar
    gain, as detectors and streaming audio models declare them."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "C"], ["g" if state else "y"], transB=1),
    ]
    inits = [init("W", low_rank(rng, (16, 4, 3, 3), 4)), init("B", np.zeros(16, np.float32)),
             init("G", low_rank(rng, (8, 16), 3)), init("C", np.zeros(8, np.float32))]
    inputs = [tensor("x", [batch, 4, 9, 9])]
    if state:
        nodes += [helper.make_node("Reshape", ["h", "hshape"], ["h2"]),
                  helper.make_node("Add", ["g", "h2"], ["gh"]),
                  helper.make_node("Mul", ["gh", "gain"], ["y"])]
        inits.append(init("hshape", np.array([1, 8], np.int64)))
        inputs += [tensor("h", [1, 1, 8]), tensor("gain", [])]
    return make_model(nodes, inputs, [tensor("y", [batch, 8])], inits)


def test_fixed_batch_state_and_scalar_inputs_run_one_sample_at_a_time():
    """x [1, 4, 9, 9] given with the samples along its batch axis, h [1, 1, 8] and the scalar gain
    given one whole input per sample: every run takes one sample, and the report says so."""
    rng = np.random.default_rng(0)
    n = 40
    calib = {"x": rng.standard_normal((n, 4, 9, 9)).astype(np.float32),
             "h": rng.standard_normal((n, 1, 1, 8)).astype(np.float32),
             "gain": rng.uniform(0.5, 2, n).astype(np.float32)}
    model = state_model(rng, 1)
    out, report = compress(model, CompressConfig(eps=0.05, rank_multiple=1), calibration=_reader(calib))
    assert report.calibration["run_batch"] == 1
    layout = report.calibration["inputs"]
    assert layout["x"]["given"] == "samples along axis 0" and layout["x"]["static"] == [True] * 4
    assert layout["h"]["given"] == layout["gain"]["given"] == "one whole input per sample"
    assert report.drop <= 0.05 and report.mac_ratio > 1
    data = load_calibration(_reader(calib), out)
    assert predict(out, data)[0].shape == (n, 1, 8)  # one whole output per sample


def test_fine_tuning_a_model_that_runs_one_sample_at_a_time_is_one_error():
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((20, 4, 9, 9)).astype(np.float32),
             "h": rng.standard_normal((20, 1, 1, 8)).astype(np.float32), "gain": np.ones(20, np.float32)}
    with pytest.raises(Exception, match="batched along axis 0"):
        compress(state_model(rng, 1), CompressConfig(eps=0.05, select="hessian"), calibration=_reader(calib))


def test_inputs_that_want_different_batches_are_one_error():
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((10, 4, 9, 9)).astype(np.float32),
             "h": rng.standard_normal((10, 1, 1, 8)).astype(np.float32), "gain": np.ones(10, np.float32)}
    with pytest.raises(Exception, match="different batches"):  # whole inputs need runs of one sample
        load_calibration(_reader(calib), state_model(rng, 4))


def test_a_fixed_batch_of_four_runs_in_fours_and_fills_up_the_last_run():
    rng = np.random.default_rng(1)
    model = state_model(rng, 4, state=False)
    n = 10  # not a multiple of 4
    x = rng.standard_normal((n, 4, 9, 9)).astype(np.float32)
    data = load_calibration(_reader({"x": x}), model)
    assert data.run_batch == 4
    (y,) = predict(model, data)
    sess = session(model)
    expected = [sess.run(None, {"x": np.repeat(x[i:i + 1], 4, 0)})[0][0] for i in range(n)]
    np.testing.assert_allclose(y, np.stack(expected), rtol=1e-5, atol=1e-6)
    prepared = prepare(model)
    stats, _ = capture(prepared, find_targets(prepared)[0], data, batch_size=64)
    conv = next(s for s in stats.values() if s.is_conv)
    assert conv.rows == n * 81  # every position of every sample once: the last run's repeats not counted
    out, report = compress(model, CompressConfig(eps=0.05), calibration=_reader({"x": x}))
    assert report.calibration["run_batch"] == 4 and report.drop <= 0.05


def reshape_model(rng) -> onnx.ModelProto:
    """A Reshape whose target shape is computed through float arithmetic on a Shape, as
    paddle2onnx writes: onnx's shape inference gives up on it, and so on the MatMul after it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["k"], axis=0),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["kf", "two"], ["half"]),
        helper.make_node("Floor", ["half"], ["hf"]),
        helper.make_node("Cast", ["hf"], ["h"], to=TensorProto.INT64),
        helper.make_node("Concat", ["zero", "two_i", "h"], ["shape"], axis=0),  # (N, 2, 32): 0 keeps N
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["y"]),
    ]
    inits = [init("one", np.array([1], np.int64)), init("two", np.array([2.0], np.float32)),
             init("zero", np.array([0], np.int64)), init("two_i", np.array([1], np.int64) * 2),
             init("W", low_rank(rng, (32, 24), 3))]
    return make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", None)], inits)


def test_costs_where_shape_inference_gives_up_are_onnxruntimes():
    rng = np.random.default_rng(0)
    model = prepare(reshape_model(rng))
    feed = {"x": rng.standard_normal((1, 64)).astype(np.float32)}
    with pytest.raises(Exception, match="cannot be inferred"):
        node_costs(model, {"x": (1, 64)})  # shapes alone: onnx's inference cannot follow the Reshape
    (matmul,) = [c for c in costs_at(model, feed) if c.op_type == "MatMul"]
    assert matmul.macs == 2 * 32 * 24  # the two 32-wide rows one sample becomes, times W
    x = rng.standard_normal((80, 64)).astype(np.float32)
    out, report = compress(model, CompressConfig(eps=0.05, metric="cosine", rank_multiple=1),
                           calibration=_reader({"x": x}))
    assert report.macs_before == 2 * 32 * 24 and report.mac_ratio > 1.5 and report.drop <= 0.05


def wide_dense_model(rng, width: int, rows_per_sample: int = 1) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    shape = ["N", width] if rows_per_sample == 1 else ["N", rows_per_sample, width]
    return make_model(nodes, [tensor("x", shape)], [tensor("y", None)],
                      [init("W", low_rank(rng, (width, 16), 4))])


def test_a_layer_wider_than_the_vectors_it_sees_keeps_only_the_diagonal():
    """2048 wide, 100 samples of one vector each: the moment's shrinkage keeps its diagonal only,
    so that is what is kept (16 KB, not 32 MB), and it is exactly the diagonal of the moment."""
    rng = np.random.default_rng(0)
    model = prepare(wide_dense_model(rng, 2048))
    x = rng.standard_normal((100, 2048)).astype(np.float32) * np.linspace(0.1, 3, 2048, dtype=np.float32)
    (target,), _ = find_targets(model)
    stats, _ = capture(model, [target], CalibrationSet({"x": x}), batch_size=32)
    s = stats[target.name]
    assert s.diagonal and s.moment_sum.nbytes == 2048 * 8
    np.testing.assert_allclose(s.second_moment(), np.mean(x.astype(np.float64) ** 2, axis=0), rtol=1e-5)
    # at fixed ranks: 30 of 100 samples in the search part, too few to bound eps on the others
    out, report = compress(model, CompressConfig(select="rank", ratio=0.4, rank_multiple=1),
                           calibration=_reader({"x": x}))
    assert report.mac_ratio > 2
    assert report.memory["statistics_bytes"] < 2048 * 2048


def test_statistics_over_max_memory_are_one_line_before_they_are_allocated(tmp_path):
    """4096 wide, 5600 rows: a 128 MiB moment, over the third of --max-memory 256M they may take."""
    rng = np.random.default_rng(0)
    model = wide_dense_model(rng, 4096, rows_per_sample=100)
    x = rng.standard_normal((80, 100, 4096)).astype(np.float32)  # 56 in the search part: 5600 rows
    with pytest.raises(OutOfMemory, match="--max-memory"):
        compress(model, CompressConfig(eps=0.05, max_memory=2**28, holdout=0.3), calibration=_reader({"x": x}))
    src, calib = tmp_path / "wide.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, x=x)
    result = _cli(["convert", str(src), str(tmp_path / "out.onnx"), "--calib", str(calib), "--max-memory", "256M",
                   "--holdout", "0.3"])
    assert result.exit_code == 2 and not (tmp_path / "out.onnx").exists()
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: the layers' input statistics need") and "--max-memory" in line


def test_running_out_of_memory_anywhere_is_one_line(tmp_path, monkeypatch):
    """A MemoryError (numpy could not allocate; under `ulimit -v`) in any stage is the same kind
    of line, naming the stage and the option, and nothing is written."""
    from onnx_lowrank.pipeline import stages as pipeline

    def short(*args, **kwargs):
        raise MemoryError("Unable to allocate 4.69 GiB")

    monkeypatch.setattr(pipeline, "build_problems", short)
    rng = np.random.default_rng(0)
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(wide_dense_model(rng, 64), src)
    np.savez(calib, x=rng.standard_normal((40, 64)).astype(np.float32))
    result = _cli(["convert", str(src), str(tmp_path / "out.onnx"), "--calib", str(calib)])
    assert result.exit_code == 2 and not (tmp_path / "out.onnx").exists()
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: out of memory in the decompose stage") and "--max-memory" in line


class _reader:
    """onnxruntime's CalibrationDataReader protocol over a dict of arrays: one get_next() each."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.done = arrays, False

    def get_next(self):
        if self.done:
            return None
        self.done = True
        return self.arrays


def _cli(args):
    from typer.testing import CliRunner

    return CliRunner().invoke(cli.app, args, env={"COLUMNS": "250"})
