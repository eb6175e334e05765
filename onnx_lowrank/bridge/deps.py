"""The optional dependencies of the bridge: torch and onnx2torch, imported only when a bridge
function runs, so the converter itself stays installable without them."""

from __future__ import annotations

import importlib
import sys
import types

from ..errors import OnnxLowrankError

INSTALL_HINT = "pip install 'onnx-lowrank[torch]'"

# ONNX ops whose onnx2torch converters call torchvision
TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")

# True when onnx2torch was imported against the stand-in below rather than a real torchvision
torchvision_stubbed = False


def require_torch() -> None:
    """Import torch and onnx2torch, or raise one line telling how to install them."""
    try:
        importlib.import_module("torch")
    except ImportError:
        raise _missing("torch") from None
    try:
        _import_onnx2torch()
    except ImportError:
        raise _missing("onnx2torch") from None


def _missing(name: str) -> OnnxLowrankError:
    return OnnxLowrankError(f"the PyTorch bridge needs {name}, which is not installed: {INSTALL_HINT}")


def _import_onnx2torch() -> types.ModuleType:
    if "onnx2torch" in sys.modules:
        return importlib.import_module("onnx2torch")
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - absent, or a wheel built for another torch (fails on its ops)
        return _import_without_torchvision()
    return importlib.import_module("onnx2torch")


def _import_without_torchvision() -> types.ModuleType:
    """onnx2torch imports torchvision at import time, only for its NonMaxSuppression and RoiAlign
    converters. The torchvision wheels on PyPI drag in CUDA packages and do not load next to a
    CPU torch, so onnx2torch is installed with --no-deps. Give its import a stand-in torchvision
    whose functions raise, and take the stand-in out of sys.modules again right after, so no
    other code mistakes it for the real package."""
    global torchvision_stubbed

    def unavailable(*args, **kwargs):
        raise OnnxLowrankError("this model uses NonMaxSuppression or RoiAlign, which onnx2torch runs "
                               "through torchvision; torchvision is not installed")

    stub = types.ModuleType("torchvision")
    stub.ops = types.ModuleType("torchvision.ops")
    for fn in ("nms", "box_convert", "roi_align"):
        setattr(stub.ops, fn, unavailable)
    added = {"torchvision": stub, "torchvision.ops": stub.ops}
    sys.modules.update(added)
    try:
        module = importlib.import_module("onnx2torch")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    torchvision_stubbed = True
    return module
