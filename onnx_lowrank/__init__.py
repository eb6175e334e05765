"""onnx-lowrank: low-rank compression of ONNX models.

    from onnx_lowrank import CompressConfig, compress
    model, report = compress("in.onnx", CompressConfig(eps=0.005), calibration="calib.npz", labels="labels")
"""

__version__ = "0.1.0"

from .config import CompressConfig  # noqa: E402
from .pipeline import compress, compress_file  # noqa: E402

__all__ = ["CompressConfig", "compress", "compress_file", "__version__"]
