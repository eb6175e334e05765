"""The command line: one line and exit status 2 for bad input, never a traceback."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from helpers import MODELS, conv_model, mnist_test_images
from onnx import numpy_helper
from typer.testing import CliRunner

from onnx_lowrank import cli
from onnx_lowrank.cli import app
from onnx_lowrank.pipeline import stages as pipeline, verify

runner = CliRunner()


def test_inspect_lists_targets_and_methods():
    result = runner.invoke(app, ["inspect", str(MODELS / "digit_cnn.onnx")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "5 targets, 0 skipped" in result.output
    assert result.output.count("tucker2-cp") == 3  # the three convs; the Gemms take svd only


def test_inspect_says_why_a_depthwise_conv_is_skipped(tmp_path):
    model = conv_model(np.ones((8, 1, 3, 3), np.float32), input_shape=(1, 8, 6, 6), group=8)
    path = tmp_path / "dw.onnx"
    path.write_bytes(model.SerializeToString())
    result = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "depthwise conv" in result.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    for path in (tmp_path / "missing.onnx", junk):
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")
        assert "Traceback" not in result.output


def _convert(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


def _one_line_error(result, phrase):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], result.output
    assert "Traceback" not in result.output


def test_convert_rejects_bad_input_without_writing(tmp_path):
    model = MODELS / "digit_cnn.onnx"
    out = tmp_path / "out.onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    truncated = tmp_path / "half.onnx"
    truncated.write_bytes(model.read_bytes()[:100_000])
    wrong_name = tmp_path / "wrong_name.npz"
    np.savez(wrong_name, pixels=np.zeros((4, 1, 28, 28), np.float32))
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, image=np.zeros((4, 1, 32, 32), np.float32))
    digit = onnx.load(str(model))
    digit.graph.node[3].name = digit.graph.node[0].name  # the spec wants node names unique
    twins = tmp_path / "twins.onnx"
    onnx.save(digit, twins)
    digit = onnx.load(str(model))
    weight = numpy_helper.to_array(digit.graph.initializer[0]).copy()
    weight[0, 0, 0, 0] = np.nan
    digit.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, digit.graph.initializer[0].name))
    nan = tmp_path / "nan.onnx"
    onnx.save(digit, nan)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=mnist_test_images(16)[0])
    cases = [
        ((tmp_path / "missing.onnx", out), "no such file"),
        ((junk, out), "not an ONNX model"),
        ((truncated, out), "not an ONNX model"),
        ((model, out, "--calib", wrong_name), "no array for model input(s) image"),
        ((model, out, "--calib", wrong_shape), "dim 2 differs"),
        ((model, model, "--select", "rank", "--ratio", "0.5"), "would overwrite the input"),
        ((model, out, "--eps", "2"), "--eps is a quality drop"),
        ((model, out, "--select", "best"), "--select must be one of"),
        ((twins, out, "--calib", calib), "onnxruntime cannot load the model: This is an invalid model. Error: "
                                         "two nodes with same node name"),
        ((nan, out, "--calib", calib), "the model itself outputs NaN or Inf on 16 of 16 calibration samples "
                                       "(weights with NaN/Inf: conv_layers.0.weight)"),
    ]
    before = model.read_bytes()
    for args, phrase in cases:
        _one_line_error(_convert(*args), phrase)
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "half.onnx", "junk.onnx", "nan.onnx",
                                                              "twins.onnx", "wrong_name.npz", "wrong_shape.npz"]
    assert model.read_bytes() == before


def test_convert_writes_model_and_report(tmp_path):
    from helpers import mnist_test_images

    x, y = mnist_test_images(200)
    np.savez(tmp_path / "c.npz", image=x, labels=y)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = runner.invoke(app, ["convert", str(MODELS / "digit_cnn.onnx"), str(out), "--calib", str(tmp_path / "c.npz"),
                                 "--labels", "labels", "--select", "rank", "--ratio", "0.5", "--report", str(report),
                                 "--plots", str(tmp_path / "plots")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert out.exists() and report.exists()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["layers.png", "trade_off.png"]
    assert "fewer MACs" in result.output


def test_inspect_with_calibration_measures_output_error(tmp_path):
    from helpers import mnist_test_images

    x, _ = mnist_test_images(64)
    np.savez(tmp_path / "c.npz", image=x)
    result = runner.invoke(app, ["inspect", str(MODELS / "digit_cnn.onnx"), "--calib", str(tmp_path / "c.npz")],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "by output error on --calib" in result.output
    assert "spatial-svd" in result.output.split("conv_layers.3")[1].splitlines()[0]  # its cheapest within 10%


def _poison_export(monkeypatch):
    """Every model written gets a NaN in its first float initializer: the outputs go NaN."""
    from onnx import numpy_helper


    real = verify.export

    def poisoned(model, config):
        model = real(model, config)
        for i, t in enumerate(model.graph.initializer):
            w = numpy_helper.to_array(t)
            if w.dtype == np.float32 and w.size > 1:
                w = w.copy()
                w.flat[0] = np.nan
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
                break
        return model

    monkeypatch.setattr(verify, "export", poisoned)


def test_nan_outputs_fail_verification_and_write_nothing(tmp_path, monkeypatch, calib):
    _poison_export(monkeypatch)
    out = tmp_path / "out.onnx"
    result = _convert(MODELS / "digit_cnn.onnx", out, "--calib", calib, "--labels", "labels", "--eps", "0.01")
    _one_line_error(result, "outputs NaN or Inf on")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # --no-verify writes it, and says what it found
    result = _convert(MODELS / "digit_cnn.onnx", out, "--calib", calib, "--labels", "labels", "--eps", "0.01",
                      "--no-verify")
    assert result.exit_code == 0, result.output
    assert out.exists() and "warning: the compressed model outputs NaN or Inf" in result.output


def test_a_drop_over_eps_after_stepping_back_fails_verification(tmp_path, monkeypatch, calib):
    """Stepping back cannot undo damage done at export (here: a NaN in a weight of every model),
    so the check fails even with every layer kept."""

    _poison_export(monkeypatch)
    monkeypatch.setattr(pipeline, "nonfinite_samples", lambda ref, out, samples: 0)  # the drop alone must fail it
    out = tmp_path / "out.onnx"
    result = _convert(MODELS / "digit_cnn.onnx", out, "--calib", calib, "--labels", "labels", "--eps", "0.01")
    _one_line_error(result, "exceeds eps 0.01")
    assert not out.exists()


def test_an_unexpected_exception_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys, calib):
    """A bug of ours still gives a deployment pipeline one line and a non-zero exit; the traceback
    is there with ONNX_LOWRANK_DEBUG=1."""
    def broken(*args, **kwargs):
        raise IndexError("list index out of range\nsecond line")

    monkeypatch.setattr(pipeline, "capture_within", broken)
    argv = ["onnx-lowrank", "convert", str(MODELS / "digit_cnn.onnx"), str(tmp_path / "out.onnx"), "--calib", str(calib)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("ONNX_LOWRANK_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: internal error (IndexError: list index out of range)")
    assert not [line for line in err[:-1] if line.strip()] and not list(tmp_path.iterdir())
    monkeypatch.setenv("ONNX_LOWRANK_DEBUG", "1")
    with pytest.raises(IndexError):
        cli.run()
