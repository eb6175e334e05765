"""Compensation: each factored layer's last step refit by least squares so that, fed what the
compressed model upstream of it really computes, it reproduces the original layer's output.

A factorization fits each layer to the original model's inputs of that layer; in the compressed
model every layer downstream of another factored one sees inputs that have drifted, and the
errors compound. The last step of a factor chain (a 1x1 conv, a kxk conv or a dense layer of
`rank` inputs) is linear in its weight and bias given its input, so refitting it to the original
layer's output Y from the compressed model's own input Z is a ridge regression:
W = argmin |Z W^T + b - Y|^2 + lambda |W - W0|^2, regularized toward the factor W0 it replaces
(few rows for the width, as a classifier after global pooling sees: one per sample). Layers are
refit in graph order, each after those upstream of it: refit all from one run, each corrects an
input that is no longer there (measured on the default MNIST model at 7.5x MACs: drop 0.031 before,
0.003 refit in order, 0.059 refit all from one run). The original's outputs are read once, at
fixed sampled positions; a model's refits compute their inputs piece by piece (_refit_all)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration.capture import real_tokens, row_count, rows_at
from ..calibration.data import CalibrationSet, token_mask
from ..decompositions.base import ConvGeometry, Layer
from ..graph.downstream import downstream_model, pieces, with_outputs
from ..graph.index import node_attrs
from ..graph.targets import LayerTarget
from ..runtime.sessions import FoldedModel, session

SAMPLES = 1024       # calibration samples the refits read, half from each fold
ROWS = 4096          # output rows read per layer over those samples
RIDGE = 1e-4         # least regularization, relative to the input's mean energy per dimension


@dataclass
class _Reference:
    picks: list[np.ndarray]  # per run: the flat positions read, in (samples, *positions) of that run
    totals: list[int]        # per run: how many positions there were
    rows: np.ndarray         # (rows, out channels): the original layer's output there, float32


class Compensation:
    """Refits the factored layers of models built from `prepared` (verify.build) on `data`, the
    whole calibration set, split in two folds. A model is measured as its two refits, each on the
    fold it was not fitted on (`crossfit`): a refit measured on its own samples looks better than
    it is (the default MNIST model: drop 0.005 on the calibration set, 0.008 on unseen digits).
    The model written is refit on both (`refit`)."""

    def __init__(self, prepared: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet,
                 batch: int, seed: int, budget: int):
        self.targets = {t.name: t for t in targets if _supported(t)}
        self.batch = batch
        rng = np.random.default_rng(seed)
        # a group on one side, where there are two groups to split (else samples: the folds only
        # serve the search's measurement, not the held-out part's decision)
        whole = data if len(np.unique(data.group_codes())) > 1 else replace(data, groups=None)
        halves = [rng.permutation(h) for h in whole.split_positions(0.5, seed)]
        self.fold = np.zeros(int(data.indices.max()) + 1, dtype=np.int64)  # by index in the whole set
        self.fold[data.indices[halves[1]]] = 1
        # each fold's refit reads at most SAMPLES / 2 of its samples, fewer where the values a
        # refit keeps between its pieces would not fit half the budget
        per_fold = max(1, min(SAMPLES // 2, budget // 2 // max(_kept_per_sample(prepared, targets, data), 1)))
        self.parts = [data.take(np.sort(h[:per_fold])) for h in halves]
        # the rows every layer keeps, within `budget` bytes: wide outputs read fewer positions
        width = sum(t.layer.out_channels for t in self.targets.values())
        rows = max(64, min(ROWS, budget // max(4 * width, 1))) // 2
        names = [t.output for t in self.targets.values()]
        sess = session(with_outputs(prepared, names))
        self.reference: list[dict[str, _Reference]] = []
        self.runs: list[list[tuple[int, np.ndarray | None]]] = []  # per fold, per run: samples, token mask
        for part in self.parts:
            per_run = -(-rows // -(-len(part) // part.batch_for(batch)))
            picks: dict[str, list[np.ndarray]] = {n: [] for n in self.targets}
            totals: dict[str, list[int]] = {n: [] for n in self.targets}
            found: dict[str, list[np.ndarray]] = {n: [] for n in self.targets}
            self.runs.append([])
            for feed, count in part.batches(batch):
                mask = token_mask(feed)
                self.runs[-1].append((count, mask))
                for (name, t), y in zip(self.targets.items(), sess.run(names, feed)):
                    y = self._rows(part.own(y, count), mask, t)
                    pick = np.arange(len(y))
                    if len(y) > per_run:
                        pick = np.sort(rng.choice(len(y), per_run, replace=False))
                    picks[name].append(pick)
                    totals[name].append(len(y))
                    found[name].append(y[pick].astype(np.float32))
            self.reference.append({n: _Reference(picks[n], totals[n], np.concatenate(found[n]))
                                   for n in self.targets})

    def refit(self, model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
        """`model` (built by replace_layers from the prepared model, not shape-inferred) with the
        last step of the named layers' chains refit on both folds, in graph order; in place."""
        return self._refit_all(model, names, (0, 1))

    def crossfit(self, model: onnx.ModelProto, names: list[str]) -> FoldedModel:
        """`model` as it is measured: refit on the second fold to answer for the first, and on the
        first to answer for the second (`model` itself is left as it is)."""
        models = []
        for k in (0, 1):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            models.append(self._refit_all(copy, names, (1 - k,)))
        return FoldedModel(models, self.fold)

    def _refit_all(self, model: onnx.ModelProto, names: list[str], parts: tuple[int, ...]) -> onnx.ModelProto:
        """Each layer's step refit in graph order, on the folds `parts`. The steps' inputs are
        computed piece by piece: the piece for a step's input starts from what earlier pieces
        computed (kept while a later piece needs it), so all the refits of a model cost about one
        pass over the samples, not one per layer (PP-OCRv4's recognizer: 635 s to convert when
        each refit ran the model from its input, 118 s so)."""
        graph = model.graph
        inits = {init.name: init for init in graph.initializer}
        produced = {o: i for i, node in enumerate(graph.node) for o in node.output}
        steps = []  # (layer, its last step, the tensor the step reads)
        for _, name in sorted((produced[self.targets[n].output], n) for n in names if n in self.targets):
            node, bias_add = graph.node[produced[self.targets[name].output]], None
            if node.op_type == "Add":  # MatMul + bias Add: the Add holds the bias
                bias_add = node
                node = next(graph.node[produced[n]] for n in node.input if n in produced)
            fit = _last_step(node, bias_add, inits, graph)
            if fit is not None:
                steps.append((name, fit, node.input[0]))
        # every tensor a piece computes is final (its steps upstream are refit by then): later
        # pieces start from it, rather than from the model's input again through a residual path
        cut = pieces(graph, [z for _, _, z in steps])
        last_use = {n: k for k, piece in enumerate(cut) for n in piece.frontier}
        # per fold, per run: the values pieces start from (the run's feed, what pieces computed)
        values = {k: [dict(feed) for feed, _ in self.parts[k].batches(self.batch)] for k in parts}
        for k, ((name, fit, z), piece) in enumerate(zip(steps, cut)):
            first = values[parts[0]][0]
            sess = session(downstream_model(model, piece, {n: first[n] for n in piece.frontier}))
            done = [n for n in piece.frontier if last_use[n] == k]
            for runs in values.values():
                for run in runs:
                    run.update(zip(piece.outputs, sess.run(piece.outputs, {n: run[n] for n in piece.frontier})))
                    for n in done:  # no piece after this one starts from it
                        del run[n]
            self._solve(name, fit, z, values)
            if z not in last_use:
                for runs in values.values():
                    for run in runs:
                        del run[z]
        return model

    def _solve(self, name: str, fit: "_Fit", z_name: str, values: dict[int, list[dict]]) -> None:
        """The ridge regression of one step on its inputs `values` (per fold, per run), written."""
        t = self.targets[name]
        d, out = fit.weight.shape[1], self.reference[0][name].rows.shape[1]
        zz, zy = np.zeros((d, d)), np.zeros((d, out))
        zsum, ysum, m, samples = np.zeros(d), np.zeros(out), 0, 0
        for k, runs in values.items():
            part, ref = self.parts[k], self.reference[k][name]
            samples += len(part)
            ysum += ref.rows.sum(0, dtype=np.float64)
            start = 0
            for run, ((count, mask), value) in enumerate(zip(self.runs[k], runs)):
                z = part.own(value[z_name], count)
                real = real_tokens(z, mask, t)
                z = z if real is None else z[real]
                if row_count(z, fit.layer) != ref.totals[run]:
                    return  # the step's positions are not the layer's: left as factored
                z = rows_at(z, fit.layer, ref.picks[run]).reshape(len(ref.picks[run]), -1).astype(np.float64)
                y = ref.rows[start:start + len(z)]
                start += len(z)
                zz += z.T @ z
                zy += z.T @ y
                zsum += z.sum(0)
            m += start
        if fit.bias is not None:  # centred: the bias takes the means
            zz -= np.outer(zsum, zsum) / m
            zy -= np.outer(zsum, ysum) / m
        # toward the factor, the more the fewer samples for the width: the rows of one sample
        # (a conv's positions) are far from independent
        lam = max(RIDGE, d / min(m, samples)) * max(np.trace(zz), 1e-12) / d
        w = np.linalg.solve(zz + lam * np.eye(d), zy + lam * fit.weight.T).T
        fit.write(w, (ysum - w @ zsum) / m if fit.bias is not None else None)

    @staticmethod
    def _rows(y: np.ndarray, mask, t: LayerTarget) -> np.ndarray:
        """A layer's output as rows of its channels: a conv's (samples * positions, out)."""
        if t.op_type == "Conv":
            return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        real = real_tokens(y, mask, t)
        return (y if real is None else y[real]).reshape(-1, y.shape[-1])


def _kept_per_sample(prepared: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet) -> int:
    """Bytes a refit keeps per sample between its pieces, bounded: the sample's inputs and twice
    the widest layer input (a step's input and a residual path beside it), measured on one."""
    feed, _ = next(data.take(np.zeros(1, dtype=int)).batches(1))
    names = list(dict.fromkeys(t.activation for t in targets if t.activation not in feed))
    values = session(with_outputs(prepared, names)).run(names, feed) if names else []
    return sum(v.nbytes for v in feed.values()) + 2 * max((v.nbytes for v in values), default=0)


def _supported(t: LayerTarget) -> bool:
    """Layers whose output rows line up with their input rows: convs, and dense layers taking
    their samples along the rows (not W @ X, nor Gemm's transposed A)."""
    return not t.inputs_in_columns


@dataclass
class _Fit:
    """The last step's weight as (out, in): the rows of `layer` it multiplies, and where to write."""

    weight: np.ndarray
    bias: np.ndarray | None  # None: the step has no bias it may change
    layer: Layer
    write_weight: Callable[[np.ndarray], None]
    write_bias: Callable[[np.ndarray], None] | None

    def write(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.write_weight(weight)
        if bias is not None:
            self.write_bias(bias)


def _last_step(node: onnx.NodeProto, bias_add, inits: dict, graph: onnx.GraphProto) -> _Fit | None:
    """The refit of a chain's last node, or None where it is not a plain linear step on
    initializers (a grouped conv, a Reshape ending a ring, a transposed input)."""
    attrs = node_attrs(node)
    w_init = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w_init is None:
        return None
    w = numpy_helper.to_array(w_init)
    dtype = w.dtype

    def setter(init_name: str):
        def write(value: np.ndarray) -> None:
            inits[init_name].CopyFrom(numpy_helper.from_array(value.astype(dtype), init_name))
        return write

    def fit(weight: np.ndarray, layer: Layer, write_weight, bias_name: str | None) -> _Fit:
        """`weight` as (out, in); the bias is refit where it is a constant vector, one per output
        (a Conv or Gemm without one gets one, zero until written)."""
        if bias_name == "":
            bias_name = f"{node.output[0]}/refit_bias"
            graph.initializer.append(numpy_helper.from_array(np.zeros(len(weight), dtype), bias_name))
            inits[bias_name] = graph.initializer[-1]
            node.input.append(bias_name)
        bias = numpy_helper.to_array(inits[bias_name]) if bias_name in inits else None
        if bias is None or bias.shape != (len(weight),):  # a broadcast or computed C: left as it is
            return _Fit(weight.astype(np.float64), None, layer, write_weight, None)
        return _Fit(weight.astype(np.float64), bias.astype(np.float64), layer, write_weight, setter(bias_name))

    third = node.input[2] if len(node.input) > 2 else ""
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1:
            return None
        ndim = w.ndim - 2
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        geometry = ConvGeometry(tuple(w.shape[2:]), tuple(attrs.get("strides", (1,) * ndim)),
                                tuple(attrs.get("dilations", (1,) * ndim)),
                                tuple(attrs.get("pads", (0,) * (2 * ndim))),
                                "NOTSET" if auto_pad == "VALID" else auto_pad)
        return fit(w.reshape(len(w), -1), Layer(w, None, geometry),
                   lambda v: setter(node.input[1])(v.reshape(w.shape)), third)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
        return fit(w, Layer(w), setter(node.input[1]), third if attrs.get("beta", 1.0) == 1.0 else None)
    if node.op_type == "MatMul" and w.ndim == 2:  # X @ W, W (in, out); the bias in the Add after it
        bias_name = None if bias_add is None else next((n for n in bias_add.input if n in inits), None)
        return fit(w.T, Layer(w.T), lambda v: setter(node.input[1])(v.T), bias_name)
    return None
