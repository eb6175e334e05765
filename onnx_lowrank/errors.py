"""Errors the converter raises on purpose. Each message is one line a user can act on; the CLI
prints it and exits non-zero instead of showing a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the libraries
    we call put whole reports in theirs."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OnnxLowrankError(Exception):
    """Base of every error the converter reports to the user."""


class InvalidModel(OnnxLowrankError):
    """The input is not a model we can read: missing, not ONNX, truncated, inconsistent."""


class UnsupportedLayer(OnnxLowrankError):
    """A decomposition method cannot handle this layer; the message says why."""


class OutputError(OnnxLowrankError):
    """The result could not be written where asked."""


class VerificationError(OnnxLowrankError):
    """The compressed model is not what selection promised: its held-out quality drop exceeds eps,
    or it outputs NaN/Inf where the original does not. Nothing is written."""


class FinetuneDiverged(OnnxLowrankError):
    """Fine-tuning drove the model to NaN or Inf outputs (the learning rate is too large for it)."""


class OutOfMemory(OnnxLowrankError):
    """The conversion would need more memory than --max-memory allows, or than the machine gave."""


class MetricError(OnnxLowrankError):
    """The user's own metric (--metric module:function) could not be loaded, raised, or did not
    return a finite number."""


class QuantizationError(OnnxLowrankError):
    """onnxruntime's quantizer (--quantize) refused the model, or wrote one onnxruntime cannot load."""
