"""The corpus of malformed inputs for test_malformed.py: each case sets up a fresh folder (a model,
calibration data, an output path) and returns the `convert` command line to run on it.

Cases are generated from real base models (models/digit_cnn.onnx, trained weights) and from small
Conv / Gemm / MatMul+Add models built here, all taking `image` (batch, 1, 28, 28) so that one
calibration set (64 MNIST test images and their labels) fits every one of them. Everything is
deterministic: random choices come from fixed seeds.

`expect` says what a case must end in: "ok" (a valid model), "error" (one error line, nothing
written) or "any" (either; e.g. a bit flip that lands in a weight leaves a valid model)."""

from __future__ import annotations

import gzip
import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
from helpers import MODELS, init, make_model, mnist_test_images, tensor
from onnx import TensorProto, external_data_helper, helper, numpy_helper

DIGIT = MODELS / "digit_cnn.onnx"
SAMPLES = 64
EPS = "0.02"

# digit_cnn's initializers
C0W, C0B = "conv_layers.0.weight", "conv_layers.0.bias"
C3W, C3B = "conv_layers.3.weight", "conv_layers.3.bias"
C6W, C6B = "conv_layers.6.weight", "conv_layers.6.bias"
F0W, F0B = "fc_layers.0.weight", "fc_layers.0.bias"
F2W, F2B = "fc_layers.2.weight", "fc_layers.2.bias"


# ---------------------------------------------------------------------------------------------
# base models and data (built once per process)

@cache
def digit_bytes() -> bytes:
    return DIGIT.read_bytes()


@cache
def _calib_arrays() -> tuple[np.ndarray, np.ndarray]:
    return mnist_test_images(SAMPLES)


def calib_arrays() -> tuple[np.ndarray, np.ndarray]:
    x, y = _calib_arrays()
    return x.copy(), y.copy()


def _he(rng: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _small(rng: np.random.Generator, n: int) -> np.ndarray:
    return (0.05 * rng.standard_normal(n)).astype(np.float32)


def _image():
    return tensor("image", ["batch", 1, 28, 28])


def _logits():
    return tensor("logits", ["batch", 10])


@cache
def _conv_bytes() -> bytes:
    """Conv(1->8, s2) Relu Conv(8->16, s2) Relu GlobalAveragePool Flatten Gemm(16->10)."""
    rng = np.random.default_rng(101)
    nodes = [
        helper.make_node("Conv", ["image", "c1.weight", "c1.bias"], ["c1"], name="conv1", strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.weight", "c2.bias"], ["c2"], name="conv2", strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits = [init("c1.weight", _he(rng, (8, 1, 3, 3), 9)), init("c1.bias", _small(rng, 8)),
             init("c2.weight", _he(rng, (16, 8, 3, 3), 72)), init("c2.bias", _small(rng, 16)),
             init("fc.weight", _he(rng, (10, 16), 16)), init("fc.bias", _small(rng, 10))]
    return make_model(nodes, [_image()], [_logits()], inits).SerializeToString()


@cache
def _gemm_bytes() -> bytes:
    """Flatten Gemm(784->64) Relu Gemm(64->10, transB)."""
    rng = np.random.default_rng(102)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    inits = [init("fc1.weight", _he(rng, (784, 64), 784)), init("fc1.bias", _small(rng, 64)),
             init("fc2.weight", _he(rng, (10, 64), 64)), init("fc2.bias", _small(rng, 10))]
    return make_model(nodes, [_image()], [_logits()], inits).SerializeToString()


@cache
def _matmul_bytes() -> bytes:
    """Reshape(-1, 784) MatMul Add Relu MatMul Add."""
    rng = np.random.default_rng(103)
    nodes = [
        helper.make_node("Reshape", ["image", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w1"], ["m1"], name="matmul1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="matmul2"),
        helper.make_node("Add", ["m2", "b2"], ["logits"], name="add2"),
    ]
    inits = [init("shape", np.array([-1, 784], np.int64)), init("w1", _he(rng, (784, 64), 784)),
             init("b1", _small(rng, 64)), init("w2", _he(rng, (64, 10), 64)), init("b2", _small(rng, 10))]
    return make_model(nodes, [_image()], [_logits()], inits).SerializeToString()


BASES: dict[str, Callable[[], bytes]] = {"digit": digit_bytes, "conv": _conv_bytes, "gemm": _gemm_bytes,
                                         "matmul": _matmul_bytes}


def base(name: str = "digit") -> onnx.ModelProto:
    """A fresh, mutable copy of a base model."""
    return onnx.load_from_string(BASES[name]())


def base_init_names(name: str) -> list[str]:
    return [t.name for t in base(name).graph.initializer]


# ---------------------------------------------------------------------------------------------
# model edits

def _idx(m: onnx.ModelProto, name: str) -> int:
    return next(i for i, t in enumerate(m.graph.initializer) if t.name == name)


def get(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(m.graph.initializer[_idx(m, name)])


def put(m: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    m.graph.initializer[_idx(m, name)].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    return m


def node(m: onnx.ModelProto, op: str, k: int = 0) -> onnx.NodeProto:
    return [n for n in m.graph.node if n.op_type == op][k]


def cast(value: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "string":
        return np.array([str(v).encode() for v in value.reshape(-1)], dtype=object).reshape(value.shape)
    if dtype == "bool":
        return value > 0
    return value.astype(dtype)


def set_input_shape(m: onnx.ModelProto, dims, k: int = 0) -> onnx.ModelProto:
    inp = m.graph.input[k]
    inp.type.CopyFrom(helper.make_tensor_type_proto(inp.type.tensor_type.elem_type, dims))
    return m


def set_elem(vi: onnx.ValueInfoProto, elem: int) -> None:
    vi.type.tensor_type.elem_type = elem


def with_value(m: onnx.ModelProto, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    return put(m, name, fn(get(m, name)))


def nan_at(value: np.ndarray, fill: float = np.nan, every: bool = False) -> np.ndarray:
    value = value.copy()
    if every:
        value[...] = fill
    else:
        value.reshape(-1)[len(value.reshape(-1)) // 2] = fill
    return value


def set_opset(m: onnx.ModelProto, version: int) -> onnx.ModelProto:
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", version))
    return m


# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    expect: str = "any"     # "ok" | "error" | "any"
    usage: bool = False     # a bad option value: click answers with its usage block
    base: str = "digit"     # the model Ctx.model() writes by default


class Ctx:
    """One case's folder (the test's cwd): in/ (the model), calib/ (calibration data), out/ (the
    output folder). The setup writes what it needs and returns the command line; `out` and
    `report` are where the converter is asked to write (checked after a successful run)."""

    def __init__(self, root: Path, base: str = "digit"):
        self.root, self.base = root, base
        self.in_dir, self.calib_dir, self.out_dir = root / "in", root / "calib", root / "out"
        for d in (self.in_dir, self.calib_dir, self.out_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.out: Path | None = self.out_dir / "out.onnx"
        self.report: Path | None = None

    def model(self, m: onnx.ModelProto | bytes | None = None, name: str = "model.onnx") -> Path:
        data = BASES[self.base]() if m is None else m if isinstance(m, bytes) else m.SerializeToString()
        path = self.in_dir / name
        path.write_bytes(data)
        return path

    def npz(self, name: str = "calib.npz", **arrays) -> Path:
        path = self.calib_dir / name
        with open(path, "wb") as f:  # np.savez would append .npz to other suffixes
            np.savez(f, **arrays)
        return path

    def npy(self, name: str, value, allow_pickle: bool = False) -> Path:
        path = self.calib_dir / name
        with open(path, "wb") as f:
            np.save(f, value, allow_pickle=allow_pickle)
        return path

    def default_calib(self) -> Path:
        x, y = calib_arrays()
        return self.npz(image=x, labels=y)

    def args(self, src=None, out=None, calib=None, labels: str | None = "labels",
             extra: Sequence[str] = ()) -> list[str]:
        src = self.model() if src is None else src
        if out is None:
            out = self.out
        else:
            self.out = out if Path(out).is_absolute() else self.root / out
        calib = self.default_calib() if calib is None else calib
        a = ["convert", str(src), str(out), "--eps", EPS, "--calib", str(calib)]
        if labels is not None:
            a += ["--labels", labels]
        return a + [str(e) for e in extra]


CASES: list[Case] = []


# cases that run a whole conversion on the small conv model where the fault is elsewhere
# (calibration data, output paths): it converts in ~0.1 s, digit_cnn in ~0.6 s
_default_base = "digit"


def add(id: str, setup: Callable[[Ctx], list[str]], expect: str = "any", usage: bool = False) -> None:
    CASES.append(Case(id, setup, expect, usage, _default_base))


def add_model(id: str, make: Callable[[], onnx.ModelProto | bytes], expect: str = "any") -> None:
    """A case whose only fault is in the model file."""
    add(id, lambda ctx: ctx.args(src=ctx.model(make())), expect)


# -- controls: the base models, unchanged, convert ----------------------------------------------

for _name in BASES:
    add_model(f"control-{_name}", lambda n=_name: BASES[n](), "ok")


# -- model file bytes ---------------------------------------------------------------------------

# digit_cnn.onnx: ~2.5 kB of header and nodes, the initializers' raw data, then ~150 bytes of graph
# inputs/outputs and the opset import. Truncation anywhere must fail (the opset import comes last).
_HEAD = 2466
_SIZE = DIGIT.stat().st_size
_TRUNCATE = sorted({0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2466, 2500}
                   | {_SIZE * k // 12 for k in range(1, 12)}
                   | {_SIZE - d for d in (150, 90, 40, 10, 4, 3, 1)})
for _n in _TRUNCATE:
    add_model(f"truncated-{_n}", lambda n=_n: digit_bytes()[:n], "error")


def _flip(positions_bits, original: bytes | None = None) -> bytes:
    data = bytearray(digit_bytes() if original is None else original)
    for pos, bit in positions_bits:
        data[pos] ^= 1 << bit
    return bytes(data)


_rng = np.random.default_rng(20_240_601)
_flips = ([("head", int(p)) for p in _rng.integers(0, _HEAD, 14)]
          + [("tail", int(p)) for p in _rng.integers(_SIZE - 150, _SIZE, 6)]
          + [("any", int(p)) for p in _rng.integers(0, _SIZE, 6)])
_bits = _rng.integers(0, 8, len(_flips))
for _k, ((_where, _p), _b) in enumerate(zip(_flips, _bits)):
    add_model(f"bitflip-{_k:02d}-{_where}-{_p}.{_b}", lambda p=_p, b=_b: _flip([(p, int(b))]))
# the small conv model is mostly structure: its flips hit names, dims, attributes, types
_rng = np.random.default_rng(20_240_602)
for _k, (_p, _b) in enumerate(zip(_rng.integers(0, len(_conv_bytes()), 10), _rng.integers(0, 8, 10))):
    add_model(f"bitflip-conv-{_k:02d}-{_p}.{_b}", lambda p=int(_p), b=int(_b): _flip([(p, b)], _conv_bytes()))


def _overwrite(pos: int, data: bytes) -> bytes:
    out = bytearray(digit_bytes())
    out[pos:pos + len(data)] = data
    return bytes(out)


_rng = np.random.default_rng(77)
for _k, (_p, _fill) in enumerate(
        [(int(p), b"\xff\xff\xff\xff") for p in _rng.integers(_HEAD, _SIZE - 150, 4)]      # NaN-ish weights
        + [(int(p), b"\x00" * 16) for p in _rng.integers(0, _HEAD, 3)]                       # zeros in the nodes
        + [(int(p), b"\x7f\x80\x00\x00"[::-1]) for p in _rng.integers(_HEAD, _SIZE - 150, 2)]  # +Inf weight
        + [(int(p), bytes(_rng.integers(0, 256, 32, dtype=np.uint8))) for p in _rng.integers(0, _SIZE, 3)]):
    add_model(f"overwrite-{_k:02d}-{_p}", lambda p=_p, f=_fill: _overwrite(p, f))


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.onnx", digit_bytes())
    return buf.getvalue()


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    x, y = calib_arrays()
    np.savez(buf, image=x, labels=y)
    return buf.getvalue()


def _random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


_NOT_MODELS: dict[str, Callable[[], bytes]] = {
    "png": _png_bytes,
    "png-magic-only": lambda: b"\x89PNG\r\n\x1a\n",
    "zip-of-model": _zip_bytes,
    "npz": _npz_bytes,
    "text": lambda: b"hello, this is not a model\n",
    "json": lambda: json.dumps({"ir_version": 8, "graph": {"node": []}, "opset_import": [{"version": 17}]}).encode(),
    "onnx-text-format": lambda: onnx.printer.to_text(base("conv")).encode(),
    "random-16": lambda: _random_bytes(16, 1),
    "random-1k": lambda: _random_bytes(1024, 2),
    "random-64k": lambda: _random_bytes(65536, 3),
    "gzip-of-model": lambda: gzip.compress(digit_bytes(), compresslevel=1),
    "reversed-model": lambda: digit_bytes()[::-1],
    "elf-header": lambda: b"\x7fELF\x02\x01\x01" + b"\x00" * 57,
    "zeros-1k": lambda: b"\x00" * 1024,
    "ff-1k": lambda: b"\xff" * 1024,
    "utf16-text": lambda: "not a model".encode("utf-16"),
    "magic-onnx": lambda: b"ONNX",
    "tensorproto": lambda: numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString(),
    "graphproto": lambda: base("conv").graph.SerializeToString(),
    "nodeproto": lambda: base("conv").graph.node[0].SerializeToString(),
    "model-twice": lambda: digit_bytes() + digit_bytes(),
    "model-trailing-garbage": lambda: digit_bytes() + b"garbage!",
    "ir-version-only": lambda: onnx.ModelProto(ir_version=8).SerializeToString(),
}
for _name, _make in _NOT_MODELS.items():
    add_model(f"not-a-model-{_name}", _make, "error")


def _dir_model(ctx: Ctx) -> list[str]:
    (ctx.in_dir / "model.onnx").mkdir()
    return ctx.args(src=ctx.in_dir / "model.onnx")


def _fifo_model(ctx: Ctx) -> list[str]:
    os.mkfifo(ctx.in_dir / "model.onnx")
    return ctx.args(src=ctx.in_dir / "model.onnx")


def _dangling_model(ctx: Ctx) -> list[str]:
    (ctx.in_dir / "model.onnx").symlink_to(ctx.in_dir / "gone.onnx")
    return ctx.args(src=ctx.in_dir / "model.onnx")


def _symlinked_model(ctx: Ctx) -> list[str]:
    real = ctx.model()
    (ctx.in_dir / "link.onnx").symlink_to(real)
    return ctx.args(src=ctx.in_dir / "link.onnx")


add("model-path-directory", _dir_model, "error")
add("model-path-missing", lambda ctx: ctx.args(src=ctx.in_dir / "missing.onnx"), "error")
add("model-path-fifo", _fifo_model, "error")
add("model-path-dangling-symlink", _dangling_model, "error")
add("model-path-dev-null", lambda ctx: ctx.args(src="/dev/null"), "error")
add("model-path-empty-string", lambda ctx: ctx.args(src=""), "error")
add("model-path-symlink-ok", _symlinked_model, "ok")


# -- graph edits: missing initializers ----------------------------------------------------------

def _without_init(b: str, name: str) -> onnx.ModelProto:
    m = base(b)
    del m.graph.initializer[_idx(m, name)]
    return m


for _b in BASES:
    for _name in base_init_names(_b):
        add_model(f"missing-init-{_b}-{_name}", lambda b=_b, n=_name: _without_init(b, n), "error")


def _no_initializers() -> onnx.ModelProto:
    m = base("digit")
    del m.graph.initializer[:]
    return m


add_model("missing-init-digit-all", _no_initializers, "error")


# -- wrong dtypes -------------------------------------------------------------------------------

def _retyped(b: str, name: str, dtype: str) -> onnx.ModelProto:
    m = base(b)
    return put(m, name, cast(get(m, name), dtype))


_DTYPES = ("int32", "int64", "bool", "float64", "uint8", "int8", "float16", "string")
for _b, _name, _dtypes in [("digit", C0W, _DTYPES), ("digit", F0W, _DTYPES),
                           ("digit", C3B, ("float64", "int64", "float16")),
                           ("conv", "c2.weight", ("float64", "int32", "float16")),
                           ("matmul", "w1", ("float64", "int64", "bool")),
                           ("matmul", "b2", ("float64",)),
                           ("gemm", "fc1.weight", ("float16", "uint8"))]:
    for _dt in _dtypes:
        add_model(f"dtype-{_b}-{_name}-{_dt}", lambda b=_b, n=_name, d=_dt: _retyped(b, n, d))


def _input_elem(elem: int) -> onnx.ModelProto:
    m = base("digit")
    set_elem(m.graph.input[0], elem)
    return m


def _output_elem(elem: int) -> onnx.ModelProto:
    m = base("digit")
    set_elem(m.graph.output[0], elem)
    return m


for _dt, _elem in [("float64", TensorProto.DOUBLE), ("float16", TensorProto.FLOAT16), ("int64", TensorProto.INT64),
                   ("uint8", TensorProto.UINT8), ("string", TensorProto.STRING), ("undefined", 0)]:
    add_model(f"dtype-digit-input-{_dt}", lambda e=_elem: _input_elem(e))
for _dt, _elem in [("int64", TensorProto.INT64), ("float64", TensorProto.DOUBLE)]:
    add_model(f"dtype-digit-output-{_dt}", lambda e=_elem: _output_elem(e))


def _raw_resized(name: str, delta: int) -> onnx.ModelProto:
    m = base("digit")
    t = m.graph.initializer[_idx(m, name)]
    t.raw_data = t.raw_data[:delta] if delta < 0 else t.raw_data + b"\x00" * delta
    return m


def _dims_changed(name: str, dims) -> onnx.ModelProto:
    m = base("digit")
    t = m.graph.initializer[_idx(m, name)]
    del t.dims[:]
    t.dims.extend(dims)
    return m


add_model("rawdata-short-conv0-weight", lambda: _raw_resized(C0W, -4))
add_model("rawdata-long-fc0-weight", lambda: _raw_resized(F0W, 8))
add_model("rawdata-odd-length-fc2-bias", lambda: _raw_resized(F2B, -1))
add_model("dims-not-matching-data-conv3-weight", lambda: _dims_changed(C3W, [64, 32, 3, 2]))


# -- inconsistent shapes ------------------------------------------------------------------------



def _reshaped(b: str, name: str, shape) -> onnx.ModelProto:
    m = base(b)
    return put(m, name, (0.1 * np.random.default_rng(5).standard_normal(shape)).astype(np.float32))


for _b, _name, _shape, _what in [
        ("digit", C0W, (32, 2, 3, 3), "conv0-in-channels"),
        ("digit", C3W, (64, 16, 3, 3), "conv3-in-channels"),
        ("digit", C6W, (128, 64, 3, 3, 1), "conv6-rank5"),
        ("digit", C0W, (32, 1, 9), "conv0-rank3"),
        ("digit", C0B, (31,), "conv0-bias-length"),
        ("digit", C6B, (256,), "conv6-bias-length"),
        ("digit", C3B, (64, 1), "conv3-bias-rank2"),
        ("digit", F0W, (256, 1000), "gemm-k-mismatch"),
        ("digit", F2W, (10, 255), "gemm2-k-mismatch"),
        ("digit", F0W, (256, 1152, 1), "gemm-weight-rank3"),
        ("digit", F2B, (11,), "gemm-bias-length"),
        ("digit", C0W, (0, 1, 3, 3), "conv0-zero-filters"),
        ("conv", "c2.weight", (16, 4, 3, 3), "conv2-in-channels"),
        ("gemm", "fc1.weight", (785, 64), "gemm-k-mismatch"),
        ("gemm", "fc2.weight", (64, 10), "gemm-transposed-weight"),
        ("matmul", "w1", (783, 64), "matmul-k-mismatch"),
        ("matmul", "b1", (63,), "add-bias-length"),
        ("matmul", "w2", (64,), "matmul-weight-rank1")]:
    add_model(f"shape-{_b}-{_what}", lambda b=_b, n=_name, s=_shape: _reshaped(b, n, s))


def _reshape_target(value) -> onnx.ModelProto:
    m = base("matmul")
    return put(m, "shape", np.asarray(value))


for _what, _value in [("783", np.array([-1, 783], np.int64)), ("28", np.array([-1, 28], np.int64)),
                      ("fixed-batch-10", np.array([10, 784], np.int64)), ("two-minus-ones", np.array([-1, -1], np.int64)),
                      ("rank5-zeros", np.array([0, 0, 0, 0, 0], np.int64)), ("float", np.array([-1.0, 784.0], np.float32)),
                      ("empty", np.zeros(0, np.int64))]:
    add_model(f"shape-matmul-reshape-target-{_what}", lambda v=_value: _reshape_target(v))

for _what, _dims in [("32x32", ["batch", 1, 32, 32]), ("3-channels", ["batch", 3, 28, 28]),
                     ("rank3", ["batch", 28, 28]), ("rank2", ["batch", 784]), ("scalar", []),
                     ("zero-batch", [0, 1, 28, 28]), ("fixed-batch-1", [1, 1, 28, 28])]:
    add_model(f"shape-digit-declared-input-{_what}", lambda d=_dims: set_input_shape(base("digit"), d))


def _declared_output(dims) -> onnx.ModelProto:
    m = base("digit")
    out = m.graph.output[0]
    out.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, dims))
    return m


add_model("shape-digit-declared-output-11-classes", lambda: _declared_output(["batch", 11]))
add_model("shape-digit-declared-output-rank4", lambda: _declared_output(["batch", 10, 1, 1]))


def _conv_attr(name: str, value) -> onnx.ModelProto:
    m = base("digit")
    n = node(m, "Conv", 0)
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value))
    return m


add_model("shape-digit-conv-kernel-shape-5x5", lambda: _conv_attr("kernel_shape", [5, 5]))
add_model("shape-digit-conv-group-2", lambda: _conv_attr("group", 2))
add_model("shape-digit-conv-strides-zero", lambda: _conv_attr("strides", [0, 0]))
add_model("shape-digit-conv-pads-negative", lambda: _conv_attr("pads", [-1, -1, -1, -1]))
add_model("shape-digit-conv-attr-typo", lambda: _conv_attr("stride", [2, 2]))


# -- NaN / Inf weights --------------------------------------------------------------------------

for _b, _name, _fill, _every, _what in [
        ("digit", C0W, np.nan, False, "nan-conv0-weight"),
        ("digit", C0W, np.nan, True, "nan-conv0-weight-all"),
        ("digit", C0B, np.nan, False, "nan-conv0-bias"),
        ("digit", C3W, np.inf, False, "inf-conv3-weight"),
        ("digit", C6W, -np.inf, False, "neginf-conv6-weight"),
        ("digit", C6B, np.inf, True, "inf-conv6-bias-all"),
        ("digit", F0W, np.nan, False, "nan-gemm-weight"),
        ("digit", F0B, np.inf, False, "inf-gemm-bias"),
        ("digit", F2W, np.nan, False, "nan-gemm2-weight"),
        ("digit", F2B, np.nan, False, "nan-output-bias"),
        ("digit", F0W, 3e38, False, "huge-gemm-weight"),
        ("conv", "c1.weight", np.nan, False, "nan-conv1-weight"),
        ("gemm", "fc1.weight", np.inf, False, "inf-gemm-weight"),
        ("matmul", "w1", np.nan, False, "nan-matmul-weight"),
        ("matmul", "b1", np.inf, False, "inf-add-bias")]:
    # NaN/Inf that reach the outputs: the model itself is refused. Two convert: a huge finite weight
    # (layers LAPACK cannot decompose are kept, with the reason), and the small Gemm's Inf, which
    # meets a background pixel that the ReLU then zeroes (the layer is skipped: NaN or Inf weight)
    add_model(f"{_what}-{_b}", lambda b=_b, n=_name, f=_fill, e=_every: with_value(base(b), n, lambda v: nan_at(v, f, e)),
              "ok" if f"{_what}-{_b}" in ("huge-gemm-weight-digit", "inf-gemm-weight-gemm") else "error")


def _all_weights(fill: float) -> onnx.ModelProto:
    m = base("digit")
    for name in base_init_names("digit"):
        with_value(m, name, lambda v: nan_at(v, fill, every=True))
    return m


add_model("nan-all-weights-digit", lambda: _all_weights(np.nan), "error")
add_model("inf-all-weights-digit", lambda: _all_weights(np.inf), "error")
add_model("zero-all-weights-digit", lambda: _all_weights(0.0))


# -- empty / degenerate graphs -------------------------------------------------------------------

def _edit(b: str, fn: Callable[[onnx.ModelProto], object]) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        m = base(b)
        fn(m)
        return m
    return make


add_model("empty-graph-no-nodes", _edit("digit", lambda m: m.graph.ClearField("node")), "error")
add_model("empty-graph-bare", lambda: make_model([], [], []), "error")
add_model("empty-graph-no-outputs", _edit("digit", lambda m: m.graph.ClearField("output")), "error")
add_model("empty-graph-no-inputs", _edit("digit", lambda m: m.graph.ClearField("input")), "error")
add_model("empty-graph-no-graph", lambda: onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)]),
          "error")
add_model("empty-graph-identity-only", lambda: make_model(
    [helper.make_node("Identity", ["image"], ["logits"], name="id")], [_image()],
    [tensor("logits", ["batch", 1, 28, 28])]))
add_model("empty-graph-relu-flatten-only", lambda: make_model(
    [helper.make_node("Flatten", ["image"], ["f"], name="flat"), helper.make_node("Relu", ["f"], ["logits"], name="relu")],
    [_image()], [tensor("logits", ["batch", 784])]))
add_model("empty-graph-output-is-input", lambda: make_model(
    [helper.make_node("Relu", ["image"], ["unused"], name="relu")], [_image()], [_image()]))
add_model("empty-graph-output-not-produced",
          _edit("digit", lambda m: setattr(m.graph.output[0], "name", "nobody_makes_this")), "error")
add_model("empty-graph-dangling-node-input",
          _edit("digit", lambda m: node(m, "Relu", 1).input.__setitem__(0, "nobody_makes_this")), "error")


def _constant_only() -> onnx.ModelProto:
    """No graph inputs at all: the Gemm runs on a constant."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc", transB=1)]
    inits = [init("x", rng.standard_normal((1, 32)).astype(np.float32)), init("w", _he(rng, (10, 32), 32)),
             init("b", _small(rng, 10))]
    return make_model(nodes, [], [tensor("logits", [1, 10])], inits)


add_model("empty-graph-constant-only", _constant_only)


# -- cycles -------------------------------------------------------------------------------------

def _two_node_cycle(m: onnx.ModelProto) -> None:
    m.graph.node.extend([helper.make_node("Relu", ["cyc_b"], ["cyc_a"], name="cyc1"),
                         helper.make_node("Relu", ["cyc_a"], ["cyc_b"], name="cyc2")])


def _self_loop(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", ["self"], ["self"], name="selfloop"))


def _main_path_cycle(m: onnx.ModelProto) -> None:
    """The second conv reads the output of the first Gemm's Relu, downstream of itself."""
    node(m, "Conv", 1).input[0] = node(m, "Relu", 3).output[0]


def _three_cycle(m: onnx.ModelProto) -> None:
    m.graph.node.extend([helper.make_node("Relu", ["c3"], ["c1"], name="n1"),
                         helper.make_node("Relu", ["c1"], ["c2"], name="n2"),
                         helper.make_node("Relu", ["c2"], ["c3"], name="n3")])


def _cycle_into_output(m: onnx.ModelProto) -> None:
    """The last Gemm adds its own output back in: logits = Add(gemm, logits)."""
    last = m.graph.node[-1]
    last.output[0] = "pre"
    m.graph.node.append(helper.make_node("Add", ["pre", "logits"], ["logits"], name="feedback"))


def _reversed_nodes(m: onnx.ModelProto) -> None:
    nodes = list(m.graph.node)[::-1]
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)


add_model("cycle-two-nodes", _edit("digit", _two_node_cycle), "error")
add_model("cycle-self-loop", _edit("digit", _self_loop), "error")
add_model("cycle-main-path", _edit("digit", _main_path_cycle), "error")
add_model("cycle-three-nodes", _edit("conv", _three_cycle), "error")
add_model("cycle-output-feedback", _edit("gemm", _cycle_into_output), "error")
add_model("cycle-none-but-nodes-reversed", _edit("digit", _reversed_nodes))


# -- duplicated names ---------------------------------------------------------------------------

def _dup_output(m: onnx.ModelProto) -> None:
    target = node(m, "Relu", 0).output[0]
    m.graph.node.insert(1, helper.make_node("Relu", ["image"], [target], name="again"))


def _dup_init(m: onnx.ModelProto, same: bool) -> None:
    t = onnx.TensorProto()
    t.CopyFrom(m.graph.initializer[_idx(m, C0W)])
    if not same:
        t.CopyFrom(numpy_helper.from_array(np.zeros((32, 1, 3, 3), np.float32), C0W))
    m.graph.initializer.append(t)


def _dup_input(m: onnx.ModelProto) -> None:
    m.graph.input.append(m.graph.input[0])


def _dup_graph_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(m.graph.output[0])


def _rename_nodes(m: onnx.ModelProto, names) -> None:
    for n, name in zip(m.graph.node, names):
        n.name = name


def _init_shadows_output(m: onnx.ModelProto) -> None:
    out = node(m, "Relu", 0).output[0]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 32, 26, 26), np.float32), out))


def _input_is_init(m: onnx.ModelProto) -> None:
    x, _ = calib_arrays()
    m.graph.initializer.append(numpy_helper.from_array(x[:1], "image"))


def _same_node_name_twice(m: onnx.ModelProto) -> None:
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    convs[1].name = convs[0].name


def _gemm_named_like_conv(m: onnx.ModelProto) -> None:
    node(m, "Gemm", 0).name = node(m, "Conv", 0).name


add_model("dup-two-nodes-same-output", _edit("digit", _dup_output), "error")
add_model("dup-initializer-same-value", _edit("digit", lambda m: _dup_init(m, True)), "error")
add_model("dup-initializer-other-value", _edit("digit", lambda m: _dup_init(m, False)), "error")
add_model("dup-graph-input", _edit("digit", _dup_input), "error")
add_model("dup-graph-output", _edit("digit", _dup_graph_output))
add_model("dup-initializer-shadows-node-output", _edit("digit", _init_shadows_output), "error")
add_model("dup-graph-input-also-initializer", _edit("digit", _input_is_init))
# onnx's checker allows duplicate node names, but the IR spec wants names unique within their
# namespace and onnxruntime refuses to load such a model: a clear error. Empty names are allowed.
add_model("dup-node-name-two-convs", _edit("digit", _same_node_name_twice), "error")
add_model("dup-node-name-conv-and-gemm", _edit("digit", _gemm_named_like_conv), "error")
add_model("dup-node-name-all-same", _edit("digit", lambda m: _rename_nodes(m, ["n"] * len(m.graph.node))), "error")
add_model("dup-node-name-all-empty", _edit("digit", lambda m: _rename_nodes(m, [""] * len(m.graph.node))), "ok")
add_model("dup-node-name-small-gemm", _edit("gemm", lambda m: _rename_nodes(m, ["x", "fc", "y", "fc"])), "error")
add_model("dup-node-name-matmul-empty", _edit("matmul", lambda m: _rename_nodes(m, [""] * 6)), "ok")


# -- opsets, IR versions, unknown ops -------------------------------------------------------------

for _v in (1, 6, 7, 99, 0, -1):
    add_model(f"opset-{_v}", lambda v=_v: set_opset(base("digit"), v), "error" if _v in (99, 0, -1) else "any")
add_model(f"opset-{onnx.defs.onnx_opset_version()}-latest",
          lambda: set_opset(base("digit"), onnx.defs.onnx_opset_version()))
add_model("opset-small-conv-9", lambda: set_opset(base("conv"), 9))
add_model("opset-none", _edit("digit", lambda m: m.ClearField("opset_import")), "error")
add_model("opset-ml-domain-only", _edit("digit", lambda m: (m.ClearField("opset_import"), m.opset_import.append(
    helper.make_opsetid("ai.onnx.ml", 3)))), "error")
add_model("opset-duplicate-default-domain", _edit("digit", lambda m: m.opset_import.append(
    helper.make_opsetid("", 13))))
for _v in (99, 0, 1, 3, -5):
    add_model(f"ir-version-{_v}", _edit("digit", lambda m, v=_v: setattr(m, "ir_version", v)),
              "error" if _v in (99, 0, -5) else "any")


def _unknown_op(m: onnx.ModelProto, op: str, domain: str, import_domain: bool) -> None:
    relu = node(m, "Relu", 1)
    relu.op_type, relu.domain = op, domain
    if import_domain and domain:
        m.opset_import.append(helper.make_opsetid(domain, 1))


add_model("unknown-op-type", _edit("digit", lambda m: _unknown_op(m, "FooBar", "", False)), "error")
add_model("unknown-op-lowercase-relu", _edit("digit", lambda m: _unknown_op(m, "relu", "", False)), "error")
add_model("unknown-domain-op-imported", _edit("digit", lambda m: _unknown_op(m, "Swish", "com.example", True)),
          "error")
add_model("unknown-domain-op-not-imported", _edit("digit", lambda m: _unknown_op(m, "Swish", "com.example", False)),
          "error")
add_model("unknown-domain-on-conv", _edit("digit", lambda m: setattr(node(m, "Conv", 0), "domain", "com.example")),
          "error")
add_model("op-missing-required-input", _edit("digit", lambda m: node(m, "Conv", 0).input.__delitem__(1)), "error")
add_model("op-too-many-inputs", _edit("digit", lambda m: node(m, "Relu", 0).input.append("image")), "error")
add_model("op-too-many-outputs", _edit("digit", lambda m: node(m, "Relu", 0).output.append("extra")))


# -- external data ------------------------------------------------------------------------------

def _external(variant: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        m = base("digit")
        t = m.graph.initializer[_idx(m, F0W)]
        raw = t.raw_data
        location = {"missing": "weights.bin", "traversal": "../../../../../etc/passwd", "absolute": "/etc/passwd",
                    "short": "weights.bin", "ok": "weights.bin", "directory": ".", "offset-beyond": "weights.bin"}[variant]
        offset = 10**9 if variant == "offset-beyond" else 0
        external_data_helper.set_external_data(t, location, offset=offset, length=len(raw))
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        if variant in ("short", "ok", "offset-beyond"):
            (ctx.in_dir / "weights.bin").write_bytes(raw[: len(raw) // 2] if variant == "short" else raw)
        return ctx.args(src=ctx.model(m))
    return setup


for _v in ("missing", "traversal", "absolute", "short", "directory", "offset-beyond"):
    add(f"external-data-{_v}", _external(_v), "error")
add("external-data-ok", _external("ok"), "ok")


def _external_collision(flag: str | None) -> Callable[[Ctx], list[str]]:
    """OUT (flag None) or --report/... naming the input model's external-data file."""
    def setup(ctx: Ctx) -> list[str]:
        args = _external("ok")(ctx)
        target = ctx.in_dir / "weights.bin"
        if flag is None:
            ctx.out = target
            args[2] = str(target)
            return args
        ctx.report = target
        return args + [flag, str(target)]
    return setup


add("external-data-is-out", _external_collision(None), "error")
add("external-data-is-report", _external_collision("--report"), "error")


# -- calibration data (on the small conv model; a few on digit_cnn at the end) --------------------

_default_base = "conv"

def _calib(make: Callable[[Ctx], Path], labels: str | None = "labels"):
    return lambda ctx: ctx.args(calib=make(ctx), labels=labels)


def _images_as(dtype: str):
    def make(ctx: Ctx) -> Path:
        x, y = calib_arrays()
        if dtype == "object":
            value = np.empty(len(x), dtype=object)
            value[:] = list(x)
        elif dtype == "str":
            value = x.astype(str)
        elif dtype == "bytes":
            value = x.astype("S8")
        else:
            value = cast(x, dtype) if dtype == "bool" else (x * (100 if "int" in dtype else 1)).astype(dtype)
        path = ctx.calib_dir / "calib.npz"
        with open(path, "wb") as f:
            np.savez(f, image=value, labels=y)  # savez pickles object arrays
        return path
    return make


for _dt, _expect in [("int64", "any"), ("int32", "any"), ("uint8", "any"), ("bool", "error"), ("complex64", "error"),
                     ("object", "error"), ("str", "error"), ("bytes", "error"), ("float64", "ok"), ("float16", "ok")]:
    add(f"calib-dtype-{_dt}", _calib(_images_as(_dt)), _expect)


def _images_shaped(fn: Callable[[np.ndarray], np.ndarray], labels_fn=None):
    def make(ctx: Ctx) -> Path:
        x, y = calib_arrays()
        x = fn(x)
        y = labels_fn(y) if labels_fn else y[: len(x)] if x.ndim else y
        return ctx.npz(image=x, labels=y)
    return make


for _what, _fn, _expect in [
        ("rank3", lambda x: x[:, 0], "error"),
        ("rank2-flat", lambda x: x.reshape(len(x), -1), "error"),
        # one whole (1, 1, 28, 28) input per sample: a layout of its own, run one sample at a time
        ("rank5", lambda x: x[:, None], "ok"),
        ("rank6", lambda x: x[:, None, None], "error"),
        ("rank1", lambda x: x.reshape(-1), "error"),
        ("scalar", lambda x: np.float32(1.0), "error"),
        ("3-channels", lambda x: np.repeat(x, 3, axis=1), "error"),
        ("32x32", lambda x: np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))), "error"),
        ("28x27", lambda x: x[..., :27], "error"),
        ("nhwc", lambda x: x.transpose(0, 2, 3, 1), "error"),
        ("zero-samples", lambda x: x[:0], "error"),
        ("one-sample", lambda x: x[:1], "error"),
        ("two-samples", lambda x: x[:2], "any"),
        ("three-samples", lambda x: x[:3], "any"),
        ("nan-pixel", lambda x: nan_at(x, np.nan), "error"),
        ("inf-pixel", lambda x: nan_at(x, np.inf), "error"),
        ("huge-values", lambda x: x * np.float32(1e37), "any"),
        ("non-contiguous", lambda x: np.asfortranarray(x), "ok")]:
    add(f"calib-shape-{_what}", _calib(_images_shaped(_fn)), _expect)


def _pick(v, x: np.ndarray, y: np.ndarray):
    """"x": the images, "y": the labels, a callable: v(x, y), else the array given."""
    if isinstance(v, str):
        return {"x": x, "y": y}[v]
    return v(x, y) if callable(v) else v


def _npz_keys(**named):
    def make(ctx: Ctx) -> Path:
        x, y = calib_arrays()
        arrays = {k: _pick(v, x, y) for k, v in named.items()}
        return ctx.npz(**arrays)
    return make


add("calib-key-wrong-name", _calib(_npz_keys(images="x", labels="y")), "error")
add("calib-key-wrong-case", _calib(_npz_keys(Image="x", labels="y")), "error")
add("calib-key-extra-array", _calib(_npz_keys(image="x", labels="y", extra=np.zeros(3))), "any")
add("calib-key-labels-only", _calib(_npz_keys(labels="y")), "error")
add("calib-key-none", _calib(_npz_keys()), "error")
add("calib-key-no-labels-key", _calib(_npz_keys(image="x")), "error")
add("calib-key-no-labels-flag", _calib(_npz_keys(image="x", labels="y"), labels=None), "ok")
add("calib-labels-missing-key", _calib(_npz_keys(image="x", labels="y"), labels="label"), "error")
add("calib-labels-names-image", _calib(_npz_keys(image="x", labels="y"), labels="image"), "error")
add("calib-labels-npz-path", _calib(_npz_keys(image="x", labels="y"), labels="labels.npz"), "error")


def _labels_bad(fn: Callable[[np.ndarray], object]):
    def make(ctx: Ctx) -> Path:
        x, y = calib_arrays()
        return ctx.npz(image=x, labels=fn(y))
    return make


for _what, _fn, _expect in [
        ("count-63", lambda y: y[:63], "error"),
        ("count-65", lambda y: np.concatenate([y, y[:1]]), "error"),
        ("float", lambda y: y.astype(np.float32), "error"),
        ("bool", lambda y: y > 4, "error"),
        ("string", lambda y: y.astype(str), "error"),
        ("scalar", lambda y: np.int64(3), "error"),
        # labels are class indices, one per sample: a (n, 1) or one-hot (n, 10) array would broadcast
        # against the (n,) predictions in the accuracy, and indices outside the model's classes
        # make every accuracy 0 and every drop 0, so eps would bound nothing
        ("column", lambda y: y[:, None], "error"),
        ("one-hot-int", lambda y: np.eye(10, dtype=np.int64)[y], "error"),
        ("one-hot-float", lambda y: np.eye(10, dtype=np.float32)[y], "error"),
        ("out-of-range", lambda y: y + 1000, "error"),
        ("negative", lambda y: -1 - y, "error"),
        ("uint8", lambda y: y.astype(np.uint8), "ok"),
        ("empty", lambda y: y[:0], "error")]:
    add(f"calib-labels-{_what}", _calib(_labels_bad(_fn)), _expect)


def _labels_file(kind: str):
    def setup(ctx: Ctx) -> list[str]:
        x, y = calib_arrays()
        calib = ctx.npz(image=x)
        if kind == "missing":
            path = ctx.calib_dir / "labels.npy"
        elif kind == "ok":
            path = ctx.npy("labels.npy", y)
        elif kind == "wrong-count":
            path = ctx.npy("labels.npy", y[:10])
        elif kind == "pickled":
            value = np.empty(len(y), dtype=object)
            value[:] = [int(v) for v in y]
            path = ctx.npy("labels.npy", value, allow_pickle=True)
        elif kind == "garbage":
            path = ctx.calib_dir / "labels.npy"
            path.write_bytes(b"not an npy file")
        else:  # a directory
            path = ctx.calib_dir / "labels.npy"
            path.mkdir()
        return ctx.args(calib=calib, labels=str(path))
    return setup


for _k, _expect in [("missing", "error"), ("ok", "ok"), ("wrong-count", "error"), ("pickled", "error"),
                    ("garbage", "error"), ("directory", "error")]:
    add(f"calib-labels-npy-{_k}", _labels_file(_k), _expect)


def _groups(kind: str):
    """--groups given wrong (a key of the npz, or an .npy file) or right."""
    def setup(ctx: Ctx) -> list[str]:
        x, y = calib_arrays()
        g = np.arange(len(y)) // 4
        value = {"ok": g, "strings": g.astype(str), "count": g[:10], "column": g[:, None], "float": g + 0.5,
                 "one-group": np.zeros(len(y), np.int64), "empty": g[:0]}.get(kind, g)
        if kind == "npy-missing":
            return ctx.args(calib=ctx.npz(image=x, labels=y), extra=["--groups", str(ctx.calib_dir / "g.npy")])
        if kind == "npy-ok":
            return ctx.args(calib=ctx.npz(image=x, labels=y), extra=["--groups", str(ctx.npy("g.npy", g))])
        if kind == "missing-key":
            return ctx.args(calib=ctx.npz(image=x, labels=y), extra=["--groups", "groups"])
        return ctx.args(calib=ctx.npz(image=x, labels=y, groups=value), extra=["--groups", "groups"])
    return setup


for _k, _expect in [("ok", "ok"), ("strings", "ok"), ("count", "error"), ("column", "error"), ("float", "error"),
                    ("one-group", "error"), ("empty", "error"), ("missing-key", "error"), ("npy-missing", "error"),
                    ("npy-ok", "ok")]:
    add(f"calib-groups-{_k}", _groups(_k), _expect)


def _calib_bytes(name: str, data: Callable[[], bytes]):
    def make(ctx: Ctx) -> Path:
        path = ctx.calib_dir / name
        path.write_bytes(data())
        return path
    return make


for _what, _name, _data in [
        ("truncated-npz", "calib.npz", lambda: _npz_bytes()[: len(_npz_bytes()) // 2]),
        ("random-bytes-npz", "calib.npz", lambda: _random_bytes(4096, 11)),
        ("empty-npz", "calib.npz", lambda: b""),
        ("onnx-as-npz", "calib.npz", lambda: _conv_bytes()),
        ("npy-content-as-npz", "calib.npz", lambda: _npy_bytes(calib_arrays()[0])),
        ("npz-as-npy", "calib.npy", _npz_bytes),
        ("truncated-npy", "calib.npy", lambda: _npy_bytes(calib_arrays()[0])[:5000]),
        ("random-bytes-npy", "calib.npy", lambda: _random_bytes(300, 12)),
        ("txt-suffix", "calib.txt", lambda: b"1 2 3\n"),
        ("csv-suffix", "calib.csv", lambda: b"1,2,3\n"),
        ("pt-suffix", "calib.pt", _zip_bytes),
        ("no-suffix", "calib", _npz_bytes),
        ("upper-case-suffix", "calib.NPZ", _npz_bytes)]:
    add(f"calib-file-{_what}", _calib(_calib_bytes(_name, _data), labels=None),
        "any" if _what == "upper-case-suffix" else "error")


def _compressed_npz_bytes() -> bytes:
    x, y = calib_arrays()
    buf = io.BytesIO()
    np.savez_compressed(buf, image=x, labels=y)
    return buf.getvalue()


def _flipped_compressed(offset: int) -> Callable[[], bytes]:
    def make() -> bytes:
        data = bytearray(_compressed_npz_bytes())
        data[offset] ^= 0xFF
        return bytes(data)
    return make


# a byte flipped in a compressed archive: zlib, zipfile's CRC or numpy's header parser objects
for _offset in (78, 90, 117, 147, 186, 400, 2000):
    add(f"calib-file-compressed-npz-flip-{_offset}", _calib(_calib_bytes("calib.npz", _flipped_compressed(_offset))),
        "error")


def _npy_bytes(value, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=allow_pickle)
    return buf.getvalue()


def _pickled_npy(ctx: Ctx) -> Path:
    x, _ = calib_arrays()
    value = np.empty(len(x), dtype=object)
    value[:] = list(x)
    return ctx.npy("calib.npy", value, allow_pickle=True)


add("calib-file-npy-pickled-objects", _calib(_pickled_npy, labels=None), "error")
add("calib-file-npy-ok", _calib(lambda ctx: ctx.npy("calib.npy", calib_arrays()[0]), labels=None), "ok")
add("calib-file-npy-wrong-shape", _calib(lambda ctx: ctx.npy("calib.npy", calib_arrays()[0][:, 0]), labels=None),
    "error")
add("calib-file-npy-with-npz-labels", _calib(lambda ctx: ctx.npy("calib.npy", calib_arrays()[0])), "error")
add("calib-path-missing", _calib(lambda ctx: ctx.calib_dir / "missing.npz"), "error")
add("calib-path-dangling-symlink", _calib(lambda ctx: _symlink(ctx.calib_dir / "calib.npz", ctx.calib_dir / "gone.npz")),
    "error")


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _image_folder(kind: str):
    def make(ctx: Ctx) -> Path:
        from PIL import Image

        folder = ctx.calib_dir / "images"
        folder.mkdir()
        x, _ = calib_arrays()
        pixels = np.clip((x[:, 0] * 0.3081 + 0.1307) * 255, 0, 255).astype(np.uint8)
        if kind in ("ok", "rgb-sizes", "with-junk-png", "with-subfolder"):
            for i in range(8):
                im = Image.fromarray(pixels[i])
                if kind == "rgb-sizes":
                    im = im.convert("RGB").resize((28 + 4 * i, 40 - 2 * i))
                im.save(folder / f"{i:02d}.png")
        if kind == "non-image-only":
            (folder / "readme.txt").write_text("no images here\n")
            (folder / "data.npz").write_bytes(_npz_bytes())
        if kind in ("fake-png", "with-junk-png"):
            (folder / "zz.png").write_bytes(b"this is not a png")
        if kind == "empty-jpg":
            (folder / "a.jpg").write_bytes(b"")
        if kind == "with-subfolder":
            (folder / "sub.png").mkdir()
        if kind == "one-image":
            Image.fromarray(pixels[0]).save(folder / "00.png")
        return folder
    return make


for _k, _expect in [("empty", "error"), ("non-image-only", "error"), ("fake-png", "error"), ("empty-jpg", "error"),
                    ("with-junk-png", "error"), ("with-subfolder", "error"), ("one-image", "error"), ("ok", "ok"),
                    ("rgb-sizes", "ok")]:
    add(f"calib-folder-{_k}", _calib(_image_folder(_k), labels=None), _expect)


def _calib_for(b: str, **arrays):
    """Calibration data for a small base model."""
    def setup(ctx: Ctx) -> list[str]:
        x, y = calib_arrays()
        named = {k: _pick(v, x, y) for k, v in arrays.items()}
        return ctx.args(src=ctx.model(base(b)), calib=ctx.npz(**named))
    return setup


add("calib-matmul-int64-images", _calib_for("matmul", image=lambda x, y: x.astype(np.int64), labels="y"))
add("calib-gemm-extra-input", _calib_for("gemm", image="x", labels="y", other="x"), "any")
add("calib-conv-float64", _calib_for("conv", image=lambda x, y: x.astype(np.float64), labels="y"), "any")


_default_base = "digit"
add("calib-digit-float64", _calib(_images_as("float64")), "ok")
add("calib-digit-wrong-shape", _calib(_images_shaped(lambda x: x[..., :27])), "error")
add("calib-digit-labels-scalar", _calib(_labels_bad(lambda y: np.int64(3))), "error")
add("calib-digit-folder-ok", _calib(_image_folder("ok"), labels=None), "ok")


# -- output paths (OUT equal to IN on digit_cnn, the rest on the small conv model) ----------------

def _out(fn: Callable[[Ctx, Path], object], labels: str | None = "labels"):
    """`fn(ctx, src)` returns the OUT argument (or (OUT, extra args))."""
    def setup(ctx: Ctx) -> list[str]:
        src = ctx.model()
        got = fn(ctx, src)
        out, extra = got if isinstance(got, tuple) else (got, ())
        return ctx.args(src=src, out=out, labels=labels, extra=extra)
    return setup


def _hardlink(ctx: Ctx, src: Path) -> Path:
    link = ctx.out_dir / "hard.onnx"
    os.link(src, link)
    return link


def _src_via_symlink(ctx: Ctx) -> list[str]:
    real = ctx.model()
    link = ctx.in_dir / "link.onnx"
    link.symlink_to(real)
    return ctx.args(src=link, out=real)


def _existing_out(ctx: Ctx, src: Path) -> Path:
    (ctx.out_dir / "out.onnx").write_bytes(b"an older output, fine to replace")
    return ctx.out_dir / "out.onnx"


def _calib_path(ctx: Ctx, src: Path) -> Path:
    return ctx.default_calib()


def _labels_file_report(ctx: Ctx) -> list[str]:
    """--labels as a file whose name does not end in .npy, then named as the report."""
    x, y = calib_arrays()
    labels = ctx.npy("labels.dat", y)
    ctx.report = labels
    return ctx.args(calib=ctx.npy("calib.npy", x), labels=str(labels), extra=["--report", str(labels)])


def _labels_npy_out(ctx: Ctx) -> list[str]:
    x, y = calib_arrays()
    labels = ctx.npy("labels.npy", y)
    return ctx.args(calib=ctx.npz(image=x), labels=str(labels), out=labels)


add("out-equals-in", _out(lambda ctx, src: src), "error")
add("out-equals-in-dot-relative", _out(lambda ctx, src: "./in/model.onnx"), "error")
add("out-equals-in-dotdot", _out(lambda ctx, src: "out/../in/model.onnx"), "error")
add("out-equals-in-double-slash", _out(lambda ctx, src: str(ctx.in_dir) + "//model.onnx"), "error")
add("out-equals-in-symlink", _out(lambda ctx, src: _symlink(ctx.out_dir / "link.onnx", src)), "error")
add("out-equals-in-via-symlinked-src", _src_via_symlink, "error")
add("out-equals-in-symlinked-folder", _out(lambda ctx, src: _symlink(ctx.root / "alias", ctx.in_dir) / "model.onnx"),
    "error")
_default_base = "conv"
# a hard link is another name for IN's bytes; the atomic rename replaces the name, never the bytes:
# writing there is allowed, and IN stays as it was
add("out-hardlink-to-in", _out(_hardlink), "ok")
add("out-equals-calib", _out(lambda ctx, src: ctx.calib_dir / "calib.npz"), "error")
add("out-equals-labels-npy", _labels_npy_out, "error")
add("report-equals-labels-dat", _labels_file_report, "error")
add("out-missing-folder", _out(lambda ctx, src: ctx.root / "missing" / "out.onnx"), "error")
add("out-missing-nested-folder", _out(lambda ctx, src: ctx.root / "a" / "b" / "out.onnx"), "error")
add("out-is-directory", _out(lambda ctx, src: ctx.out_dir), "error")
add("out-is-root-dir", _out(lambda ctx, src: ctx.root), "error")
add("out-parent-is-file", _out(lambda ctx, src: src / "out.onnx"), "error")
add("out-proc", _out(lambda ctx, src: "/proc/out.onnx"), "error")
add("out-proc-self", _out(lambda ctx, src: "/proc/self/out.onnx"), "error")
add("out-name-too-long", _out(lambda ctx, src: ctx.out_dir / ("x" * 300 + ".onnx")), "error")
add("out-empty-string", _out(lambda ctx, src: ""), "error")
add("out-existing-file-replaced", _out(_existing_out), "ok")
add("out-dangling-symlink", _out(lambda ctx, src: _symlink(ctx.out_dir / "out.onnx", ctx.root / "nowhere.onnx")))


def _report(where: Callable[[Ctx, Path], Path]):
    def fn(ctx: Ctx, src: Path):
        report = where(ctx, src)
        ctx.report = Path(report)
        return ctx.out_dir / "out.onnx", ["--report", str(report)]
    return _out(fn)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


add("report-equals-in", _report(lambda ctx, src: src), "error")
add("report-equals-out", _report(lambda ctx, src: ctx.out_dir / "out.onnx"), "error")
add("report-equals-calib", _report(lambda ctx, src: ctx.default_calib()), "error")
add("report-proc", _report(lambda ctx, src: Path("/proc/report.json")), "error")
add("report-missing-folder", _report(lambda ctx, src: ctx.root / "missing" / "report.json"), "error")
add("report-is-directory", _report(lambda ctx, src: _mkdir(ctx.out_dir / "report.json")), "error")
add("report-parent-is-file", _report(lambda ctx, src: src / "report.json"), "error")
add("report-ok", _report(lambda ctx, src: ctx.out_dir / "report.json"), "ok")
add("plots-proc", _out(lambda ctx, src: (ctx.out_dir / "out.onnx", ["--plots", "/proc/plots"])), "error")
add("plots-parent-is-file", _out(lambda ctx, src: (ctx.out_dir / "out.onnx", ["--plots", str(src / "plots")])), "error")


_default_base = "digit"


# -- bad option values --------------------------------------------------------------------------

def _opts(*extra: str):
    return lambda ctx: ctx.args(extra=extra)


for _what, _extra, _expect, _usage in [
        ("eps-negative", ["--eps", "-0.1"], "error", False),
        ("eps-1.5", ["--eps", "1.5"], "error", False),
        ("eps-1", ["--eps", "1"], "error", False),
        ("eps-nan", ["--eps", "nan"], "error", False),
        ("eps-inf", ["--eps", "inf"], "error", False),
        ("eps-zero", ["--eps", "0"], "any", False),
        ("eps-text", ["--eps", "abc"], "error", True),
        ("eps-empty", ["--eps", ""], "error", True),
        ("unknown-option-method", ["--method", "svd"], "error", True),
        ("methods-unknown", ["--methods", "magic"], "error", False),
        ("methods-empty", ["--methods", ","], "error", False),
        ("holdout-0", ["--holdout", "0"], "error", False),
        ("holdout-1", ["--holdout", "1"], "error", False),
        ("holdout-negative", ["--holdout", "-0.2"], "error", False),
        ("holdout-nan", ["--holdout", "nan"], "error", False),
        ("confidence-1", ["--confidence", "1"], "error", False),
        ("confidence-0.3", ["--confidence", "0.3"], "error", False),
        ("confidence-nan", ["--confidence", "nan"], "error", False),
        ("batch-size-0", ["--batch-size", "0"], "error", False),
        ("batch-size-text", ["--batch-size", "many"], "error", True),
        ("rank-multiple-0", ["--rank-multiple", "0"], "error", False),
        ("jobs-negative", ["--jobs", "-1"], "error", False),
        ("select-unknown", ["--select", "best"], "error", False),
        ("metric-unknown", ["--metric", "f1"], "error", False),
        ("cost-unknown", ["--cost", "joules"], "error", False),
        ("rank-without-select", ["--rank", "4"], "error", False),
        ("select-rank-rank-0", ["--select", "rank", "--rank", "0"], "error", False),
        ("select-rank-ratio-0", ["--select", "rank", "--ratio", "0"], "error", False),
        ("select-rank-ratio-nan", ["--select", "rank", "--ratio", "nan"], "error", False),
        ("select-energy-2", ["--select", "energy", "--energy", "2"], "error", False),
        ("threads-negative", ["--threads", "-2"], "error", False),
        ("image-mean-text", ["--image-mean", "a,b,c"], "error", False),
        ("latency-unknown-provider", ["--cost", "latency", "--provider", "NoSuchProvider"], "error", False),
        ("unknown-provider", ["--provider", "NoSuchProvider"], "error", False),  # the rank widths are timed there
        ("exclude-everything", ["--exclude", "Conv,Gemm"], "any", False)]:
    add(f"option-{_what}", _opts(*_extra), _expect, _usage)


IDS = [c.id for c in CASES]
