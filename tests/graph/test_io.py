"""Loading rejects bad files with one line; saving is atomic and never leaves a partial file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import conv_model

from onnx_lowrank.errors import InvalidModel, OutputError
from onnx_lowrank.graph import io, load_model, save_model


@pytest.fixture
def model():
    weight = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    return conv_model(weight, input_shape=(1, 8, 8, 8))


def test_round_trip(tmp_path, model):
    path = tmp_path / "m.onnx"
    save_model(model, path)
    assert load_model(path).SerializeToString() == model.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"", "no IR version"),
    (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
    ("truncated", "not an ONNX model"),
])
def test_bad_files_are_one_line_errors(tmp_path, model, content, message):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        data = model.SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidModel, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(InvalidModel, match="not a file"):
        load_model(tmp_path)


def test_empty_graph_is_rejected(tmp_path, model):
    del model.graph.node[:]
    path = tmp_path / "empty.onnx"
    onnx.save_model(model, path)
    with pytest.raises(InvalidModel, match="no nodes"):
        load_model(path)


def test_save_into_missing_folder_fails_cleanly(tmp_path, model):
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "nope" / "m.onnx")


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, model, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def broken(proto, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OutputError, match="No space left"):
        save_model(model, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_large_models_go_to_external_data(tmp_path, model, monkeypatch):
    """Past protobuf's 2 GB limit the weights go to a side file; the threshold is lowered here so
    the same code path runs on a small model."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    model = onnx.shape_inference.infer_shapes(model)  # the checker reads big models from disk, as they are
    path = tmp_path / "big.onnx"
    save_model(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    loaded = load_model(path)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # caller's model untouched
