"""The command line: one line and exit status 2 for bad input, never a traceback."""

from __future__ import annotations

import numpy as np
from helpers import MODELS, conv_model
from typer.testing import CliRunner

from onnx_lowrank.cli import app

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
