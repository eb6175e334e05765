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

from ..calibration.capture import Probe, capture, probe, real_tokens, row_count, rows_at
from ..calibration.data import CalibrationSet
from ..decompositions.base import Layer
from ..graph.downstream import downstream_model, pieces
from ..graph.rewrite import Chain, LastStep
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


class References:
    """The original layers' outputs a refit is fitted to, read in the calibration pass
    (calibration.capture.PassReader): the search part split in two folds, a group on one side,
    and on each fold's samples read (`parts`: at most SAMPLES / 2 of them, fewer where what a
    refit keeps between its pieces would not fit half of `budget`), each layer's output at
    positions drawn at random: every layer within `budget` bytes, wide outputs at fewer."""

    def __init__(self, targets: list[LayerTarget], data: CalibrationSet, seed: int, budget: int):
        self.targets = {t.name: t for t in targets if _supported(t)}
        self.all_targets, self.data, self.budget = targets, data, budget
        self.rng = np.random.default_rng(seed)
        # a group on one side, where there are two groups to split (else samples: the folds only
        # serve the search's measurement, not the held-out part's decision)
        whole = data if len(np.unique(data.group_codes())) > 1 else replace(data, groups=None)
        self.halves = [self.rng.permutation(h) for h in whole.split_positions(0.5, seed)]
        self.fold = np.zeros(int(data.indices.max()) + 1, dtype=np.int64)  # by index in the whole set
        self.fold[data.indices[self.halves[1]]] = 1
        self.reads = [t.output for t in self.targets.values()]
        self.parts: list[np.ndarray] = []
        self.batch = 0
        self.reference: list[dict[str, _Reference]] = [{}, {}]
        self.runs: list[list[tuple[int, np.ndarray | None]]] = [[], []]  # per fold, per run: samples, token mask

    def plan(self, batch: int, measured: Probe) -> None:
        """The parts read, at `batch` samples per run: a refit keeps the samples' inputs and twice
        the widest layer input (a step's input and a residual path beside it) between its pieces."""
        self.batch = batch
        widest = max((measured.tensors.get(t.activation, 0) for t in self.all_targets), default=0)
        per_fold = max(1, min(SAMPLES // 2, self.budget // 2 // max(measured.feed + 2 * widest, 1)))
        self.parts = [np.sort(h[:per_fold]) for h in self.halves]
        width = sum(t.layer.out_channels for t in self.targets.values())
        rows = max(64, min(ROWS, self.budget // max(4 * width, 1))) // 2
        self._per_run = [-(-rows // -(-len(p) // self.data.batch_for(batch))) for p in self.parts]
        self._found = [{n: ([], [], []) for n in self.targets} for _ in self.parts]  # picks, totals, rows

    def visit(self, part: int, values: dict[str, np.ndarray], count: int, mask: np.ndarray | None) -> None:
        """One run of fold `part`'s samples: each layer's output rows at positions drawn at random."""
        self.runs[part].append((count, mask))
        for name, t in self.targets.items():
            y = _rows(self.data.own(values[t.output], count), mask, t)
            pick = np.arange(len(y))
            if len(y) > self._per_run[part]:
                pick = np.sort(self.rng.choice(len(y), self._per_run[part], replace=False))
            picks, totals, found = self._found[part][name]
            picks.append(pick)
            totals.append(len(y))
            found.append(y[pick].astype(np.float32))

    def done(self) -> None:
        """The rows read, joined (after the pass)."""
        self.reference = [{n: _Reference(picks, totals, np.concatenate(found))
                           for n, (picks, totals, found) in fold.items()} for fold in self._found]
        del self._found


class Compensation:
    """Refits the factored layers of the models built from the prepared model
    (pipeline.verify.assemble) to the original's outputs read in the calibration pass
    (`references`, on the search part's two folds; joined here, once). A model is measured as its two refits, each on the fold it was not fitted on
    (`crossfit`): a refit measured on its own samples looks better than it is (the default MNIST
    model: drop 0.005 on the calibration set, 0.008 on unseen digits). The model written is refit
    on both (`refit`)."""

    def __init__(self, references: References):
        references.done()
        self.targets, self.batch, self.fold = references.targets, references.batch, references.fold
        self.parts = [references.data.take(p) for p in references.parts]
        self.reference, self.runs = references.reference, references.runs

    @classmethod
    def read(cls, prepared: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet, batch: int,
             seed: int, budget: int) -> "Compensation":
        """Compensation on `data` with a pass of its own (no statistics), at `batch` samples per run."""
        references = References(targets, data, seed, budget)
        references.plan(batch, probe(prepared, targets, data, references.reads))
        capture(prepared, [], data, batch, reader=references)
        return cls(references)

    def refit(self, model: onnx.ModelProto, chains: dict[str, Chain]) -> onnx.ModelProto:
        """`model` (built by replace_layers from the prepared model, not shape-inferred, with
        `chains`) with the last step of each chain refit on both folds, in graph order; in place."""
        return self._refit_all(model, chains, (0, 1))

    def crossfit(self, model: onnx.ModelProto, chains: dict[str, Chain]) -> FoldedModel:
        """`model` as it is measured: refit on the second fold to answer for the first, and on the
        first to answer for the second (`model` itself is left as it is)."""
        models = []
        for k in (0, 1):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            models.append(self._refit_all(copy, chains, (1 - k,)))
        return FoldedModel(models, self.fold)

    def _refit_all(self, model: onnx.ModelProto, chains: dict[str, Chain], parts: tuple[int, ...]) -> onnx.ModelProto:
        """Each layer's step refit in graph order, on the folds `parts`. The steps' inputs are
        computed piece by piece: the piece for a step's input starts from what earlier pieces
        computed (kept while a later piece needs it), so all the refits of a model cost about one
        pass over the samples, not one per layer (PP-OCRv4's recognizer: 635 s to convert when
        each refit ran the model from its input, 118 s so)."""
        graph = model.graph
        inits = {init.name: init for init in graph.initializer}
        position = {node.name: i for i, node in enumerate(graph.node)}
        steps = []  # (layer, its last step, the tensor the step reads)
        for _, name, last in sorted((position[c.last.node], n, c.last) for n, c in chains.items()
                                    if n in self.targets and c.last is not None and c.last.layer.groups == 1):
            steps.append((name, _fit(graph, inits, graph.node[position[last.node]], last), last.input))
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

def _rows(y: np.ndarray, mask, t: LayerTarget) -> np.ndarray:
    """A layer's output as rows of its channels: a conv's (samples * positions, out)."""
    if t.op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    real = real_tokens(y, mask, t)
    return (y if real is None else y[real]).reshape(-1, y.shape[-1])


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


def _fit(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], node: onnx.NodeProto, step: LastStep) -> _Fit:
    """The refit of a chain's last step (`node` in `graph`, whose initializers `inits` names). Its
    bias is refit where it is a constant vector, one per output; a Conv or Gemm without one gets
    one, zero until written."""
    stored = numpy_helper.to_array(inits[step.weight])
    dtype = stored.dtype

    def setter(init_name: str):
        def write(value: np.ndarray) -> None:
            inits[init_name].CopyFrom(numpy_helper.from_array(value.astype(dtype), init_name))
        return write

    weight = stored.T if step.transposed else stored.reshape(len(stored), -1)  # (out, in)

    def write_weight(value: np.ndarray) -> None:  # (out, in) back to the stored layout
        setter(step.weight)(value.T if step.transposed else value.reshape(stored.shape))

    bias_name = step.bias
    if bias_name is None and node.op_type in ("Conv", "Gemm") and len(node.input) < 3:
        bias_name = f"{node.output[0]}/refit_bias"
        graph.initializer.append(numpy_helper.from_array(np.zeros(len(weight), dtype), bias_name))
        inits[bias_name] = graph.initializer[-1]
        node.input.append(bias_name)
    bias = numpy_helper.to_array(inits[bias_name]) if bias_name in inits else None
    if bias is None or bias.shape != (len(weight),):  # a broadcast or computed C: left as it is
        return _Fit(weight.astype(np.float64), None, step.layer, write_weight, None)
    return _Fit(weight.astype(np.float64), bias.astype(np.float64), step.layer, write_weight, setter(bias_name))
