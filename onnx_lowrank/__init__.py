"""onnx-lowrank: low-rank compression of ONNX models.

    from onnx_lowrank import CompressConfig, compress
    model, report = compress("in.onnx", CompressConfig(eps=0.005), calibration="calib.npz", labels="labels")
"""

import os

__version__ = "0.1.0"

# One BLAS thread unless the user chose otherwise (only takes effect if numpy is not loaded yet,
# as in the command line): OpenBLAS's idle threads spin, and on a busy machine they starve the
# work (measured on 2 shared cores: the default model's decompositions took 118 s with OpenBLAS's
# default threads, 15 s with one). The parallel work is onnxruntime's, which has its own pool
# (and torch's, which OPENBLAS_NUM_THREADS does not touch).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .config import CompressConfig  # noqa: E402
from .pipeline import compress, compress_file  # noqa: E402

__all__ = ["CompressConfig", "compress", "compress_file", "__version__"]
