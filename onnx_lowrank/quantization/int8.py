"""INT8 quantization by onnxruntime's quantizer (`--quantize int8`), applied to the model as it is
written, so that the drop `--eps` bounds is the quantized model's.

Convolution models get static QDQ: activation ranges from calibration runs (MinMax), uint8
activations and int8 weights per output channel. (With int8 activations, onnxruntime's CPU
optimizer left the conv on the graph input and the convs that share an input as
DequantizeLinear -> float Conv; with uint8 it fused every one into QLinearConv, measured on the
default model.) Models whose MACs are mostly MatMul/Gemm (transformer encoders) get dynamic
quantization, activation ranges taken per input at run time: on MiniLM-L6, static QDQ moved the
sentence embeddings by r2 1.48 and dynamic by 0.018, and dynamic ran faster too.
Either way a layer can be kept in float: the verify stage backs off along a path of such moves
and rank steps (pipeline/verify.py). A layer here is a *unit*: the Conv/Gemm/MatMul nodes that came from
one target (its whole factor chain), or one such node with a weight elsewhere in the model."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import version_converter

from ..calibration.data import CalibrationSet
from ..errors import QuantizationError, first_line
from ..graph.downstream import with_outputs
from ..graph.index import opset_version
from ..graph.rewrite import Chain
from ..graph.targets import node_name
from ..runtime.sessions import RUNTIME_ERRORS, costs_at, runtime_message, session

MODES = ("int8",)
PER_CHANNEL_OPSET = 13  # the first opset whose DequantizeLinear has a per-channel axis
UNIT_OPS = ("Conv", "Gemm", "MatMul")  # what a back-off keeps in float, unit by unit
RANGE_SAMPLES = 256    # calibration samples the activation ranges come from (MinMax: enough to settle)
RANGE_BATCH = 16       # ... per run: the quantizer's session outputs every tensor's range, and keeps its arena
PROBE_SAMPLES = 64     # samples each unit's own quantization error is measured on
PROBE_BATCH = 8        # ... per run
INT8_MAC_COST = 1 / 3  # an int8 MAC against a float one, for ordering the back-off: onnxruntime's int8
#                        models ran 2.6-4.6x faster than float on these machines (benchmarks/quantize.py)


@dataclass(frozen=True)
class Unit:
    name: str                  # the target's name, or the node's
    nodes: tuple[str, ...]     # its Conv/Gemm/MatMul nodes in the built model
    inputs: tuple[str, ...]    # the tensors it reads from the rest of the graph
    outputs: tuple[str, ...]   # ... and those it gives it
    macs: int                  # per sample


class Quantizer:
    """Quantizes built models the same way each time: the same calibration runs, the same mode."""

    def __init__(self, model: onnx.ModelProto, data: CalibrationSet, batch: int, feed: dict[str, np.ndarray]):
        costs = costs_at(model, feed)
        conv = sum(c.macs for c in costs if c.op_type == "Conv")
        self.dynamic = conv < sum(c.macs for c in costs) / 2
        take = np.linspace(0, len(data) - 1, min(RANGE_SAMPLES, len(data))).round().astype(int)
        self.runs = [] if self.dynamic else [f for f, _ in data.take(np.unique(take)).batches(min(batch, RANGE_BATCH))]
        self.probe = data.take(np.arange(min(PROBE_SAMPLES, len(data))))
        self.checked = False  # whether a model it wrote has loaded in onnxruntime

    @property
    def mode(self) -> str:
        if self.dynamic:
            return ("int8 dynamic (weights per channel; activations quantized at run time: MatMul-heavy model; "
                    "measured one sample per run)")
        return "int8 static QDQ (weights per channel; activation ranges from calibration: MinMax)"

    def __call__(self, model: onnx.ModelProto, keep_float: Iterable[str] = ()) -> onnx.ModelProto:
        """`model` quantized, the nodes named in `keep_float` left in float."""
        return self._quantize(model, self.runs, keep_float)

    def for_timing(self, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
        """`model` (a layer's micro-model, --cost latency) quantized in the same mode, its ranges
        from `feed` alone: a latency depends on the ops and shapes, not on the ranges."""
        return self._quantize(model, [] if self.dynamic else [feed], ())

    def _quantize(self, model: onnx.ModelProto, runs: list[dict], keep_float: Iterable[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
            quantize_static

        class Runs(CalibrationDataReader):
            def __init__(self, runs):
                self.runs = iter(runs)

            def get_next(self):
                return next(self.runs, None)

        named = named_nodes(model)
        if (opset_version(named) or PER_CHANNEL_OPSET) < PER_CHANNEL_OPSET:
            # per-channel DequantizeLinear takes its `axis` from opset 13 on; the quantizer writes
            # it into older models regardless (paddle2onnx's opset 12), which onnxruntime refuses
            try:
                named = version_converter.convert_version(named, PER_CHANNEL_OPSET)
            except Exception as e:  # the converter raises what onnx's checks raise
                raise _refused(f"per-channel int8 needs opset {PER_CHANNEL_OPSET}, and onnx could not convert "
                               f"the model's opset {opset_version(named)} to it ({first_line(e)})") from None
        exclude = sorted(set(keep_float))
        with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
            out = Path(tmp) / "quantized.onnx"
            try:
                if self.dynamic:
                    quantize_dynamic(named, out, per_channel=True, weight_type=QuantType.QInt8,
                                     nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
                else:
                    quantize_static(named, out, Runs(runs), quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    nodes_to_exclude=exclude)
            except Exception as e:  # the quantizer raises whatever its checks and onnx raise
                raise _refused(first_line(e)) from None
            quantized = onnx.load(str(out))
        if not self.checked:  # the quantizer writes some models onnxruntime refuses (float16 ones)
            try:
                session(quantized)
            except RUNTIME_ERRORS as e:
                raise _refused(f"it wrote a model onnxruntime cannot load ({runtime_message(e)})") from None
            self.checked = True
        return quantized


def _refused(why: str) -> QuantizationError:
    return QuantizationError(f"onnxruntime's quantizer cannot quantize this model: {why}; convert without "
                             "--quantize")


def quantized_units(quantized: onnx.ModelProto, found: list[Unit]) -> set[str]:
    """The units the quantizer did quantize: a node of theirs reads a DequantizeLinear output
    (static QDQ) or was replaced (dynamic: MatMulInteger, ConvInteger). It leaves alone what it
    has no kernel for (float64 layers, for one)."""
    nodes = {n.name: n for n in quantized.graph.node}
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {u.name for u in found if any(name not in nodes or any(i in dequantized for i in nodes[name].input)
                                         for name in u.nodes)}


def node_names(model: onnx.ModelProto) -> list[str]:
    """Each node's name, as the quantizer is given it (it excludes nodes by name): an unnamed one
    gets the name targets and the report know it by (op type and first output: the same whatever
    else is factored)."""
    used = {n.name for n in model.graph.node}
    names = []
    for node in model.graph.node:
        name = node.name
        if not name:
            name = node_name(node)
            while name in used:
                name += "_"
            used.add(name)
        names.append(name)
    return names


def named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the names of node_names. Always a copy: onnxruntime's quantizer moves
    the weights of the model it is given to external data."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node, name in zip(out.graph.node, node_names(model)):
        node.name = name
    return out


def units(model: onnx.ModelProto, chains: dict[str, Chain], feed: dict[str, np.ndarray] | None = None) -> list[Unit]:
    """The units of a built (float) model: each factored target's Conv/Gemm/MatMul nodes (its
    factor chain, as the rewrite wrote it: `chains`) together, every other such layer alone (a
    target kept whole is its node, named as the target). A layer reads a weight: the product of
    two activations (attention's) is no unit. Their MACs at `feed`'s shapes (0 without)."""
    macs = {c.name: c.macs for c in costs_at(named_nodes(model), feed)} if feed is not None else {}
    owner = {node: name for name, chain in chains.items() for node in chain.nodes}
    weights = {t.name for t in model.graph.initializer}
    groups: dict[str, list[tuple[str, onnx.NodeProto]]] = {}
    for node, called in zip(model.graph.node, node_names(model)):
        if node.op_type not in UNIT_OPS or not weights.intersection(node.input):
            continue
        name = owner.get(called, called)
        groups.setdefault(name, []).append((called, node))
    result = []
    for name, members in groups.items():
        made = {o for _, n in members for o in n.output}
        read = {i for _, n in members for i in n.input if i}
        inputs = tuple(sorted(read - made - weights))
        outputs = tuple(sorted(made - read))
        result.append(Unit(name, tuple(n for n, _ in members), inputs, outputs,
                           sum(macs.get(n, 0) for n, _ in members)))
    return result


def unit_errors(float_model: onnx.ModelProto, quantized: onnx.ModelProto, found: list[Unit],
                data: CalibrationSet) -> dict[str, float]:
    """Each unit's own share of the quantized model's error: the relative error of its outputs
    (quantized against float, on the same samples) less that of its inputs. Both models run
    unoptimized, so the float tensors between the quantized ops stay there to be read; in runs of
    PROBE_BATCH samples, summed as they go (a transformer's layer outputs are 50 MB per 64 samples)."""
    def present(model: onnx.ModelProto) -> set[str]:
        return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}

    both = present(float_model) & present(quantized)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in float_model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def visible(t: str) -> str | None:
        """`t`, or where the quantized model has it: the quantizer folds a Relu or Clip into the
        range of the op before it, and the op's own output is then gone."""
        for _ in range(4):
            if t in both:
                return t
            after = consumers.get(t, [])
            if len(after) != 1:
                return None
            t = after[0].output[0]
        return None

    read = {u.name: ([visible(t) for t in u.inputs], [visible(t) for t in u.outputs]) for u in found}
    tensors = sorted({t for ins, outs in read.values() for t in ins + outs if t is not None})
    sessions = [session(with_outputs(model, tensors).SerializeToString(), "unoptimized")
                for model in (float_model, quantized)]
    energy, noise = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    for feed, _ in data.batches(PROBE_BATCH):
        exact, approx = (dict(zip(tensors, s.run(tensors, feed))) for s in sessions)
        for t in tensors:
            e = exact[t].astype(np.float64)
            energy[t] += float(np.sum(e * e))
            noise[t] += float(np.sum((approx[t] - e) ** 2))

    def error(t: str | None) -> float:
        return float(np.sqrt(noise[t] / energy[t])) if t is not None and energy[t] else 0.0

    return {name: max(0.0, max(map(error, outs), default=0.0) - max(map(error, ins), default=0.0))
            for name, (ins, outs) in read.items()}


def unfused(model: onnx.ModelProto, keep_float: Iterable[str] = ()) -> list[str]:
    """The quantized Conv/Gemm/MatMul nodes that onnxruntime's CPU kernels would still run in float
    (a DequantizeLinear feeding a float op, not fused into QLinearConv, QGemm, ...): the graph
    onnxruntime optimizes, written out and read."""
    kept = set(keep_float)
    with tempfile.TemporaryDirectory() as tmp:
        session(model, "deploy", optimized_to=str(Path(tmp) / "optimized.onnx"))
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"))
    dequantized = {o for n in optimized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in optimized.graph.node if n.op_type in UNIT_OPS and n.name not in kept
            and n.input and n.input[0] in dequantized]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs through the root logger (one line per bias it cannot quantize per
    channel): not the user's business; its refusals reach them as QuantizationError."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
