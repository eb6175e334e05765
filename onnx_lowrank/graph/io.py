"""Reading and writing models. Reading rejects what is not a usable model with one clear line;
writing is atomic (a temporary file renamed into place) and switches to external data when the
weights pass protobuf's 2 GB limit."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from ..errors import InvalidModel, OutputError, first_line

# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise InvalidModel(f"{p}: no such file")
    if not p.is_file():
        raise InvalidModel(f"{p}: not a file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except DecodeError:
        raise InvalidModel(f"{p}: not an ONNX model (the file does not parse as one; truncated?)") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as e:  # the last: a bad external-data path
        raise InvalidModel(f"{p}: cannot read the model or its external data: {first_line(e)}") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidModel(f"{p}: not an ONNX model (no IR version, graph or opset)")
    if not model.graph.node:
        raise InvalidModel(f"{p}: the model's graph has no nodes")
    if not model.graph.output:
        raise InvalidModel(f"{p}: the model's graph has no outputs")
    small = tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD
    try:
        # shapes first: the checker wants every graph output typed, onnxruntime does not
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(model) if small else str(p))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InvalidModel(f"{p}: invalid ONNX model: {first_line(e)}") from None
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` atomically: everything goes to a temporary folder next to `path`
    and is renamed into place, external data first, so a failure leaves no partial file."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{p}: the folder {folder} does not exist")
    external = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = p.name + ".data"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=folder))
    except OSError as e:
        raise OutputError(f"{p}: cannot write to {folder}: {e.strerror}") from None
    try:
        if external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)  # converting to external data changes the tensors in place
            onnx.save_model(to_write, str(tmp / p.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            if (tmp / data_name).exists():  # tensors under size_threshold stay inline
                os.replace(tmp / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(tmp / p.name))
        os.replace(tmp / p.name, p)
    except OSError as e:
        raise OutputError(f"{p}: cannot write: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


APART = 1 << 20  # initializers of at least this many bytes are kept apart (weights_apart)


def weights_apart(model: onnx.ModelProto, values: bool = True) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """The model with its large initializers as external-data stubs, their names and (`values`)
    their values as arrays: for onnxruntime's SessionOptions.add_external_initializers and for
    shape inference, which then do not serialize and parse the weights again (the converter
    builds dozens of sessions and infers shapes a handful of times: VGG-16's 550 MB went through
    protobuf twice each time). Shape inference needs no values: reading them copies the weights."""
    light = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _set(light, fd, value)
    graph = model.graph
    for fd, value in graph.ListFields():
        if fd.name != "initializer":
            _set(light.graph, fd, value)
    names, weights = [], []
    for t in graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type in _NUMPY_TYPES else None
        size = int(np.prod(t.dims)) * dtype.itemsize if dtype is not None else 0
        if size < APART or not t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
            light.graph.initializer.add().CopyFrom(t)
            continue
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(size))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        names.append(t.name)
        if values:
            weights.append(np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims)))
    return light, names, weights


_NUMPY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _set(target, fd, value) -> None:
    """One field of a protobuf message, copied onto another of its type."""
    if fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)
