"""Calibration readers and their checks against the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, make_model, tensor
from onnx import helper
from PIL import Image

from onnx_lowrank.calibration.data import CalibrationError, ImageOptions, load_calibration

RNG = np.random.default_rng(0)


@pytest.fixture
def model():
    return conv_model(RNG.standard_normal((6, 3, 3, 3)).astype(np.float32), input_shape=("N", 3, 8, 8))


def test_npz_with_labels_key(tmp_path, model):
    path = tmp_path / "c.npz"
    np.savez(path, x=RNG.standard_normal((10, 3, 8, 8)).astype(np.float32), labels=np.arange(10))
    data = load_calibration(path, model, labels="labels")
    assert len(data) == 10 and data.labels.tolist() == list(range(10))


def test_npy_and_labels_file(tmp_path, model):
    np.save(tmp_path / "x.npy", RNG.standard_normal((7, 3, 8, 8)))  # float64: cast to the model's float32
    np.save(tmp_path / "y.npy", np.arange(7))
    data = load_calibration(tmp_path / "x.npy", model, labels=tmp_path / "y.npy")
    assert data.inputs["x"].dtype == np.float32 and len(data.labels) == 7


def test_reader_protocol(model):
    class Reader:  # what onnxruntime's quantizer takes: get_next() -> dict | None
        def __init__(self):
            self.left = 3

        def get_next(self):
            self.left -= 1
            return None if self.left < 0 else {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}

    assert len(load_calibration(Reader(), model)) == 6


def test_image_folder(tmp_path, model):
    for i in range(3):
        Image.fromarray(RNG.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = load_calibration(tmp_path, model, image=ImageOptions())
    assert data.inputs["x"].shape == (3, 3, 8, 8) and data.inputs["x"].dtype == np.float32


def test_synthetic_when_no_data(model):
    data = load_calibration(None, model)
    assert data.synthetic and data.inputs["x"].shape[1:] == (3, 8, 8)


def test_split_is_disjoint_and_seeded(tmp_path, model):
    np.save(tmp_path / "x.npy", RNG.standard_normal((20, 3, 8, 8)).astype(np.float32))
    data = load_calibration(tmp_path / "x.npy", model)
    search, held = data.split(0.3, seed=1)
    assert len(held) == 6 and len(search) == 14
    assert set(search.indices).isdisjoint(held.indices)
    assert data.split(0.3, seed=1)[1].indices.tolist() == held.indices.tolist()


@pytest.mark.parametrize("arrays,message", [
    ({"wrong": np.zeros((4, 3, 8, 8), np.float32)}, "no array for model input"),
    ({"x": np.zeros((4, 3, 9, 8), np.float32)}, "dim 2 differs"),
    ({"x": np.zeros((4, 3, 8), np.float32)}, "wants 4 dims"),
    ({"x": np.array([["a"] * 8] * 3 * 4).reshape(4, 3, 8, 1).repeat(8, 3)}, "calibration array is <U1"),
    ({"x": np.full((4, 3, 8, 8), np.nan, np.float32)}, "NaN or Inf"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "no samples"),
])
def test_mismatches_are_one_line_errors(tmp_path, model, arrays, message):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationError, match=message) as info:
        load_calibration(path, model)
    assert "\n" not in str(info.value)


def test_extra_array_and_uneven_counts(tmp_path):
    two = make_model([helper.make_node("Add", ["a", "b"], ["y"])], [tensor("a", ["N", 2]), tensor("b", ["N", 2])],
                     [tensor("y", None)])
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((3, 2), np.float32), b=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationError, match="different numbers of samples"):
        load_calibration(path, two)
    with pytest.raises(CalibrationError, match="one array but the model has 2 inputs"):
        np.save(tmp_path / "a.npy", np.zeros((3, 2), np.float32))
        load_calibration(tmp_path / "a.npy", two)


def test_labels_must_match(tmp_path, model):
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 8, 8), np.float32))
    np.save(tmp_path / "y.npy", np.arange(4))
    with pytest.raises(CalibrationError, match="4 labels for 5"):
        load_calibration(tmp_path / "x.npy", model, labels=tmp_path / "y.npy")
