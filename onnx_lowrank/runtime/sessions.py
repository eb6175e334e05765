"""onnxruntime sessions and running models over calibration data: the one place a session is
opened (`session`, in the profile a use needs), what onnxruntime raises, and `predict`."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from ..calibration.data import CalibrationSet, token_mask, without_padding
from ..errors import first_line
from ..graph.cost import NodeCost, node_costs
from ..graph.downstream import with_outputs
from ..graph.io import weights_apart
from ..graph.prepare import infer_shapes


# what onnxruntime raises on a model it cannot load or run (plain Exceptions, not RuntimeError)
RUNTIME_ERRORS = tuple(getattr(_state, name) for name in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel", "NotImplemented",
    "RuntimeException", "EPFail", "EngineError", "NotFound", "ModelRequiresCompilation", "DeviceReset",
    "ModelLoaded", "ModelLoadCanceled") if hasattr(_state, name))


def runtime_message(error: Exception) -> str:
    """The first line of onnxruntime's message, without its "[ONNXRuntimeError] : 1 : FAIL : "."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(error))


PROFILES = ("measure", "deploy", "unoptimized", "offline")


def session(model: onnx.ModelProto | bytes, profile: str = "measure", threads: int = 0,
            provider: str = "CPUExecutionProvider", weights: dict[str, np.ndarray] | None = None,
            optimized_to: str | None = None) -> ort.InferenceSession:
    """A session opened in one of PROFILES:
    - measure: the converter's own runs over the calibration data. Idle threads sleep instead of
      spinning: on a machine shared with other work (or with our own numpy between runs) spinning
      threads steal the cores the work needs. No memory arena: it keeps the largest batch's
      buffers for the session's life, and the converter holds several sessions (measured on
      VGG-16 at 224^2: the arena's growth was GBs of the peak). Weights are handed over apart,
      not serialized again; `weights`: the values of initializers `model` holds as in-memory
      stubs (graph.io.weights_apart), for models built from one made weightless once (the
      sensitivity probes).
    - deploy: as a deployment opens it, onnxruntime's defaults but `threads` and `provider`:
      what timings measure.
    - unoptimized: no graph optimization, each node as the graph writes it (the quantizer's
      probes of single tensors).
    - offline: onnxruntime's basic optimization level only (constant folding, redundant nodes:
      standard ops), to write the graph it makes (offline_optimized).
    `optimized_to`: a file onnxruntime writes the graph it optimized to (which nodes it fused).
    Every profile logs fatal errors only: a failed run reaches the user once, as our error line."""
    if profile not in PROFILES:
        raise ValueError(f"unknown session profile {profile!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    if optimized_to is not None:
        options.optimized_model_filepath = optimized_to
    if profile == "unoptimized":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile == "offline":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if profile == "measure":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = False
    if profile != "measure" or isinstance(model, bytes):
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return ort.InferenceSession(data, options, providers=[provider])
    light, names, arrays = weights_apart(model)
    if weights:
        held = [t.name for t in light.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL and t.name in weights]
        names, arrays = names + held, arrays + [weights[n] for n in held]
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(w) for w in arrays])
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=[provider])
    sess.weights = arrays  # onnxruntime reads them where they are: they must live as long as the session
    return sess



def offline_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's offline optimization at its basic level (--optimize): constant folding and
    redundant-node elimination, standard ops only, so the file still runs on every provider and
    platform (the extended and layout levels are specific to the machine that runs them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, "offline", optimized_to=path)
        optimized = onnx.load(path)
    del optimized.graph.value_info[:]
    return infer_shapes(optimized)

class FoldedModel:
    """Models that each answer for part of the calibration set: sample i (by its index in the
    whole set) is run by models[fold[i]]. A model refit on the calibration data is measured so
    on samples it was not fitted on (compensation/refit.py: two refits, each on the other's fold)."""

    def __init__(self, models: list[onnx.ModelProto], fold: np.ndarray):
        self.models, self.fold = models, fold
        self._sessions: list[ort.InferenceSession] | None = None

    def map(self, f: Callable[[onnx.ModelProto], onnx.ModelProto]) -> "FoldedModel":
        """Each model passed through `f` (export touches, quantization)."""
        return FoldedModel([f(m) for m in self.models], self.fold)

    def get_outputs(self):
        return self.sessions()[0].get_outputs()

    def sessions(self) -> list[ort.InferenceSession]:
        if self._sessions is None:
            self._sessions = [session(m) for m in self.models]
        return self._sessions

    def predict(self, data: CalibrationSet, batch_size: int, names: list[str]) -> list[np.ndarray]:
        fold = self.fold[data.indices]
        parts = [(np.flatnonzero(fold == k), sess) for k, sess in enumerate(self.sessions())]
        parts = [(idx, predict(sess, data.take(idx), batch_size, names)) for idx, sess in parts if len(idx)]
        joined = []
        for j in range(len(names)):
            first = parts[0][1][j]
            out = np.empty((len(data),) + first.shape[1:], first.dtype)
            for idx, outs in parts:
                out[idx] = outs[j]
            joined.append(out)
        return joined


def predict(model: onnx.ModelProto | ort.InferenceSession | FoldedModel, data: CalibrationSet, batch_size: int = 64,
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """The named outputs (default: the graph's) over the whole set, in the batches the model takes;
    a transformer's token outputs zero at padding (calibration.data.without_padding)."""
    if isinstance(model, FoldedModel):
        return model.predict(data, batch_size, outputs or [o.name for o in model.get_outputs()])
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    runs: list[list[tuple[np.ndarray, int]]] = [[] for _ in names]
    for feed, count in data.batches(batch_size):
        mask = token_mask(feed)
        for store, value in zip(runs, sess.run(names, feed)):
            store.append((without_padding(value, mask), count))
    return [data.join(r) for r in runs]


def measuring_batch(model: onnx.ModelProto, batch_size: int) -> int:
    """The batch a model's quality is measured in: one sample per run for a dynamically quantized
    one. DynamicQuantizeLinear takes its range over the whole run, so a sample's outputs depend on
    the samples batched with it; one per run, they are the sample's own (a batch-1 deployment's)."""
    return 1 if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) else batch_size


def require_provider(provider: str) -> None:
    """ValueError unless this onnxruntime has `provider`."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"--provider {provider} is not in this onnxruntime ({', '.join(available)})")


def costs_at(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None) -> list[NodeCost]:
    """Each node's cost (graph.cost) at `feed`'s input shapes (the graph's, without it); the
    shapes onnx's inference cannot give are those onnxruntime computes running `feed`."""
    if feed is None:
        return node_costs(model)
    return node_costs(model, {k: v.shape for k, v in feed.items()}, lambda names: _runtime_shapes(model, names, feed))


def _runtime_shapes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors `names` as onnxruntime computes them running `feed`."""
    graph_inputs = {i.name for i in model.graph.input}
    inner = [n for n in names if n not in graph_inputs]
    try:
        values = session(with_outputs(model, inner)).run(inner, feed)
    except RUNTIME_ERRORS:  # the caller's error says which shape is missing
        return {}
    shapes = {n: tuple(v.shape) for n, v in zip(inner, values)}
    shapes.update((n, tuple(feed[n].shape)) for n in names if n in graph_inputs and n in feed)
    return shapes
