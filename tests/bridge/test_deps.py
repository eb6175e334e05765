"""The bridge's dependencies are optional: nothing imports torch until a bridge function runs,
and a missing torch or onnx2torch is one line saying how to install it."""

import subprocess
import sys

import pytest

from onnx_lowrank.bridge import require_torch
from onnx_lowrank.errors import OnnxLowrankError


def test_converter_does_not_import_torch():
    code = ("import sys, onnx_lowrank.cli, onnx_lowrank.graph, onnx_lowrank.decompositions, onnx_lowrank.bridge; "
            "print(sorted(m for m in ('torch', 'onnx2torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["torch", "onnx2torch"])
def test_missing_dependency_is_one_line(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(OnnxLowrankError) as e:
        require_torch()
    message = str(e.value)
    assert "\n" not in message
    assert missing in message and "pip install 'onnx-lowrank[torch]'" in message
