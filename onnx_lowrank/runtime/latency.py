"""Latency measured in onnxruntime: of whole models (`bench`) and of single layers, each as a
micro-model of the layer (or of its factors' chain) at the layer's real input shape, for
`--cost latency`. MAC counts do not say what runs faster: a chain of thin convs has overheads a
dense conv has not, and kernels like some channel counts better than others; so measure.

Timings are medians after warm-up runs, in the execution provider and thread count asked for,
and layer timings are cached on disk (keyed by the micro-model's structure, not its weight
values, plus provider, threads, onnxruntime version and machine), so a second conversion of the
same model, or of one with the same layer shapes, times nothing again."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..decompositions.base import Factors
from ..graph.prepare import infer_shapes
from ..graph.rewrite import replace_layers, set_ir_version
from ..graph.targets import LayerTarget, find_targets
from .sessions import session

if TYPE_CHECKING:  # quantize imports onnxruntime's quantizer: only --quantize needs it
    from ..quantization.int8 import Quantizer

WARMUP = 3
MIN_RUNS, MAX_RUNS, MIN_SECONDS = 10, 200, 0.05
PAUSE = 0.1  # seconds between two sessions' blocks (interleaved): the workers of the one before stop spinning


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per run
    min: float
    max: float
    runs: int


def time_session(sess: ort.InferenceSession, feed: dict[str, np.ndarray], min_runs: int = MIN_RUNS,
                 min_seconds: float = MIN_SECONDS, max_runs: int = MAX_RUNS) -> Timing:
    """Run `feed` WARMUP times, then at least `min_runs` times and `min_seconds` long."""
    for _ in range(WARMUP):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return Timing(float(np.median(times)), float(np.min(times)), float(np.max(times)), len(times))


def interleaved(sessions, feed: dict[str, np.ndarray], min_runs: int = 20,
                min_seconds: float = 1.0, block: int = 5) -> list[list[float]]:
    """Seconds per run of each session, in turn on the same feed: `block` timed runs of one, then
    of the next, over and over, so that a shared machine's load falls on all alike. Each block
    starts with an untimed run, after a pause of PAUSE when a session runs more than one thread:
    the session before leaves its worker threads spinning (onnxruntime's default), on the cores
    the next one needs. One untimed run was not enough: at 2 threads, batch 32, every model of
    benchmarks/quantize.py then timed at ~7 ms, against ~3 ms each with the pause (as alone)."""
    for sess in sessions:
        for _ in range(WARMUP):
            sess.run(None, feed)
    pause = PAUSE if any(s.get_session_options().intra_op_num_threads != 1 for s in sessions) else 0.0
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < min_runs or time.perf_counter() - start < min_seconds:
        for sess, store in zip(sessions, times):
            time.sleep(pause)
            sess.run(None, feed)
            for _ in range(block):
                t = time.perf_counter()
                sess.run(None, feed)
                store.append(time.perf_counter() - t)
    return times


def random_feed(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """N(0,1) inputs for every input of `sess`, the first dim set to `batch` when it is not fixed."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = list(i.shape)
        if shape and not isinstance(shape[0], int):
            shape[0] = batch
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"input {i.name!r} has unknown dimensions {i.shape}: give data with --calib")
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(i.type)
        if dtype is None:
            raise ValueError(f"input {i.name!r} of type {i.type}: give data with --calib")
        feed[i.name] = rng.normal(size=shape).astype(dtype)
    return feed


class LayerTimer:
    """Median latency of a layer, or of a factorization of it, in its own micro-model."""

    def __init__(self, model: onnx.ModelProto, provider: str = "CPUExecutionProvider", threads: int = 0,
                 batch: int = 1, cache: str | os.PathLike | None = None, quantizer: Quantizer | None = None) -> None:
        """`model`: the prepared model the targets were found in. `quantizer` (--quantize): each
        micro-model is timed quantized, as the layer will run (int8 kernels do not follow MACs the
        way float ones do: a thin chain's extra pass costs more against its cheaper MACs)."""
        self.model = model
        self.quantizer = quantizer
        self.provider, self.threads, self.batch = provider, threads, batch
        self.cache_path = Path(cache) if cache is not None else default_cache_path()
        self._cache: dict[str, float] = read_cache(self.cache_path)
        self._dirty = False
        self._micro: dict[str, tuple[onnx.ModelProto, LayerTarget, dict]] = {}
        self.timed = 0   # micro-models actually run (not found in the cache)

    def seconds(self, target: LayerTarget, input_shape: tuple[int, ...], factors: Factors | None) -> float:
        """Per run at batch `self.batch`. `input_shape`: one sample's activation shape, batch first
        (1, ...) (Gemm's transposed A: (K, 1)), as captured."""
        model, micro_target, feed = self._micro_model(target, input_shape)
        if factors is not None:
            model = replace_layers(model, [(micro_target, factors)], infer=False).model
        # keyed by the float structure and the quantizer's mode: a model found in the cache is not quantized
        key = self._key(model, self.quantizer.mode if self.quantizer is not None else "float")
        if key not in self._cache:
            if self.quantizer is not None:
                model = self.quantizer.for_timing(model, feed)
            sess = session(model, "deploy", self.threads, self.provider)
            self._cache[key] = time_session(sess, feed).median
            self._dirty = True
            self.timed += 1
        return self._cache[key]

    def save(self) -> None:
        if self._dirty:
            write_cache(self.cache_path, self._cache)
            self._dirty = False

    def _micro_model(self, target: LayerTarget, input_shape: tuple[int, ...]):
        if target.name not in self._micro:
            # batch first, but for Gemm's transposed A, whose samples are its columns
            columns = target.op_type == "Gemm" and target.inputs_in_columns
            shape = (input_shape[0], self.batch) if columns else (self.batch,) + tuple(input_shape[1:])
            model = micro_model(self.model, target, shape)
            found, _ = find_targets(model)
            if len(found) != 1:
                raise ValueError(f"{target.name}: its micro-model has {len(found)} targets")
            sess_inputs = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
            rng = np.random.default_rng(0)
            feed = {name: rng.normal(size=shape).astype(target.dtype) for name, shape in sess_inputs.items()}
            self._micro[target.name] = (model, found[0], feed)
        return self._micro[target.name]

    def _key(self, model: onnx.ModelProto, precision: str) -> str:
        # the structure (ops, attributes, shapes) without the weight values: latency does not
        # depend on them, and the key stays small
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        for t in skeleton.graph.initializer:
            t.ClearField("raw_data")
            t.ClearField("float_data")
        for n in skeleton.graph.node:
            n.name = ""
        where = f"{precision}|{self.provider}|{self.threads}|{ort.__version__}|{machine_key()}"
        return hashlib.sha256(skeleton.SerializeToString(deterministic=True) + where.encode()).hexdigest()


def micro_model(model: onnx.ModelProto, target: LayerTarget, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The target's node of `model` (with its bias Add and the Constant nodes of its weights)
    alone, its activation a graph input of `input_shape`."""
    if target.gemm_c is not None:
        raise ValueError(f"{target.name}: a Gemm whose C is computed at run time is not timed alone")
    x = target.activation
    nodes = [target.node] + ([target.bias_add] if target.bias_add is not None else [])
    needed = {name for n in nodes for name in n.input} - {x}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(target.dtype))
    inits = [t for t in model.graph.initializer if t.name in needed]
    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in needed]
    graph = helper.make_graph(constants + nodes, f"micro {target.name}",
                              [helper.make_tensor_value_info(x, elem, list(input_shape))],
                              [helper.make_tensor_value_info(target.output, elem, None)], inits)
    micro = helper.make_model(graph, opset_imports=list(model.opset_import))
    micro.ir_version = model.ir_version
    set_ir_version(micro)
    return infer_shapes(micro)  # gives the output its shape (the checker wants one)


def default_cache_path() -> Path:
    root = os.environ.get("ONNX_LOWRANK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "onnx-lowrank")
    return Path(root) / "latency.json"


def read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def write_cache(path: Path, entries: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read_cache(path), **entries}  # another process may have added entries
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latency-")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written costs time next run, nothing else


def machine_key() -> str:
    """What a timing depends on of the machine: its architecture, CPU model and core count."""
    return f"{platform.machine()}|{_cpu_name()}|{os.cpu_count()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
