"""Feature capture: run the model once over calibration data in onnxruntime with every target's
input added as an extra graph output (graph.downstream.with_outputs),
and keep per-layer statistics instead of activations: the second moment of the layer's input
patches (for data-aware factors and layer errors) and a bounded random sample of those patches
(for output similarity). Memory does not grow with the size of the calibration set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from scipy.linalg.blas import ssyrk

from ..decompositions.base import Layer
from ..errors import OutOfMemory
from ..graph.downstream import with_outputs
from ..graph.targets import LayerTarget, same_pads
from ..runtime.sessions import session
from .data import CalibrationSet, token_mask, without_padding


def patches(x: np.ndarray, layer: Layer, rng: np.random.Generator, max_rows: int,
            columns: bool = False) -> np.ndarray:
    """Rows the layer's weight multiplies, (rows, groups, in_per_group * prod(kernel)): a conv's
    im2col patches, a dense layer's input vectors; at most `max_rows` of them, drawn at random."""
    total = row_count(x, layer, columns)
    pick = rng.choice(total, max_rows, replace=False) if total > max_rows else np.arange(total)
    return rows_at(x, layer, pick, columns)


def row_count(x: np.ndarray, layer: Layer, columns: bool = False) -> int:
    """How many rows `x` gives the layer: a conv's output positions over the batch, a dense
    layer's input vectors."""
    if not layer.is_conv:
        return x.size // x.shape[-2 if columns else -1]
    return x.shape[0] * int(np.prod(layer.geometry.out_size(x.shape[2:])))


def rows_at(x: np.ndarray, layer: Layer, pick: np.ndarray, columns: bool = False) -> np.ndarray:
    """The rows numbered `pick` (of row_count): (rows, groups, in_per_group * prod(kernel)). A
    conv's row k is the patch of output position k in (batch, *positions) order."""
    if not layer.is_conv:
        if columns:  # W @ X, or Gemm's transposed A: the columns of X are the inputs
            rows = np.moveaxis(x, -1, -2).reshape(-1, x.shape[-2])
        else:
            rows = x.reshape(-1, x.shape[-1])
        if len(pick) < len(rows):
            rows = rows[pick]
        return rows[:, None, :].astype(np.float32, copy=False)
    g = layer.geometry
    n = g.ndim
    size = x.shape[2:]
    pads = g.pads
    if g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(size, g.kernel, g.strides, g.dilations, g.auto_pad)
    idx = np.unravel_index(pick, (x.shape[0],) + g.out_size(size))
    # gather the taps of the picked positions only (padding the whole batch would copy all of
    # it): per axis, tap coordinates in the input, those in the padding read as zero
    coords, valid = [], np.ones((len(pick),) + tuple(g.kernel), dtype=bool)
    for i in range(n):
        c = idx[1 + i][:, None] * g.strides[i] - pads[i] + np.arange(g.kernel[i]) * g.dilations[i]
        inside = (c >= 0) & (c < size[i])
        shape = [len(pick)] + [1] * n
        shape[1 + i] = g.kernel[i]
        coords.append(np.clip(c, 0, size[i] - 1).reshape(shape))
        valid &= inside.reshape(shape)
    images = idx[0].reshape([len(pick)] + [1] * n)
    rows = x[(images, slice(None)) + tuple(coords)]         # (rows, *kernel, C): advanced axes first
    rows = np.moveaxis(rows * valid[..., None], -1, 1)      # (rows, C, *kernel)
    return rows.reshape(len(pick), layer.groups, -1).astype(np.float32, copy=False)


@dataclass
class LayerStats:
    """Running statistics of one layer's inputs. Their memory is bounded by what they can hold:
    a K-wide input seen in n < K vectors (a classifier after a flatten or a global pool sees one
    per sample) has a second moment of rank <= n, which the shrinkage below takes entirely to its
    diagonal; such a layer keeps only the diagonal (K numbers, not K^2: VGG-16's first FC layer
    25088 wide, 4.7 GiB in float64 as a full matrix). Layers that see more vectors than their
    width keep the full matrix, which is then smaller than the vectors."""

    moment_sum: np.ndarray       # (groups, d, d): upper triangle of the sum of x x^T over the rows seen
    #                              ((groups, d) if diagonal; the whole symmetric moment once `final`)
    rows: int
    in_spatial: tuple[int, ...]  # what Layer.macs takes, from the real input
    in_shape: tuple[int, ...]    # the real input of one sample, batch dim 1
    sample: np.ndarray           # (<= keep, groups, d) float32: a uniform random sample of rows
    sample_keys: np.ndarray
    is_conv: bool = True
    final: bool = False          # moment_sum holds the shrunk second moment itself (second_moment)

    @property
    def dim(self) -> int:
        return self.moment_sum.shape[-1]

    @property
    def diagonal(self) -> bool:
        return self.moment_sum.ndim == 2

    @property
    def nbytes(self) -> int:
        return self.moment_sum.nbytes + self.sample.nbytes + self.sample_keys.nbytes

    def second_moment(self, shrink: bool = True) -> np.ndarray:
        """E[x x^T], shrunk toward its diagonal by d / rows: with few vectors for its width (a
        classifier after global pooling sees one per sample) the full matrix fits the
        calibration set and not the data (DESIGN: MobileNetV2's 1280-wide classifier whitened
        from 191 vectors lost 40% agreement on held-out photos). A diagonal moment of a dense
        layer stays a (d,) vector, which the whitening and the error meter take as the diagonal
        matrix it is; a conv's is made a matrix (its decompositions slice blocks of it)."""
        if shrink and not self.diagonal:  # made once, in place: a second copy of a wide layer's would double it
            if not self.final:
                m = self.moment_sum
                _mirror(m)
                m /= max(self.rows, 1)
                alpha = min(1.0, self.dim / max(self.rows, 1))
                idx = np.arange(self.dim)
                diag = m[:, idx, idx].copy()
                m *= 1 - alpha
                m[:, idx, idx] = diag
                self.final = True
            m = self.moment_sum
            return m[0] if m.shape[0] == 1 else m
        if self.final:
            raise ValueError("the moment was shrunk in place; its unshrunk form is gone")
        m = self.moment_sum / max(self.rows, 1)
        if not self.diagonal:
            _mirror(m)
        elif not self.is_conv and m.shape[0] == 1:
            return m[0]
        else:
            m = np.stack([np.diag(g) for g in m])
        return m[0] if m.shape[0] == 1 else m


def _mirror(m: np.ndarray) -> None:
    """(groups, d, d) upper triangles made whole symmetric matrices, in place."""
    upper = np.triu_indices(m.shape[-1], 1)
    for g in m:
        g[upper[1], upper[0]] = g[upper]


ROWS_PER_DIM = 32      # rows sampled per layer over the whole set, per input dimension ...
MIN_ROWS = 8192        # ... and at least this many: enough for a second moment, a bounded cost ...
MAX_ROWS = 32768       # ... and at most this many: a 4608-wide conv (512 channels, 3x3) would take
#                        147k rows, 1.6e12 multiply-adds for its moment alone; 32768 rows estimate it
#                        with a shrinkage of 14% toward the diagonal (d / rows)


def input_width(target: LayerTarget) -> int:
    """The length of the rows a layer's weight multiplies (a conv's patch, per group)."""
    return target.layer.in_per_group * int(np.prod(target.layer.kernel))


def row_budget(target: LayerTarget) -> int:
    """Rows sampled from a layer's inputs over the whole calibration set."""
    return max(MIN_ROWS, min(ROWS_PER_DIM * input_width(target), MAX_ROWS))


@dataclass(frozen=True)
class Probe:
    """One sample's run, measured: the bytes of its feed and of each tensor a run reads (the
    graph's outputs, the targets' inputs, a reader's tensors). Runs are sized to memory by it."""

    feed: int
    tensors: dict[str, int]

    def batch_within(self, batch_size: int, budget: int) -> int:
        """The most samples (up to `batch_size`) one run may take for what it hands out and
        onnxruntime's own buffers, counted as as large again twice, to fit `budget` bytes (VGG-16
        at 224^2 hands out 55 MB of layer inputs per sample: 3.5 GB at a batch of 64)."""
        per_sample = sum(self.tensors.values()) + self.feed
        return max(1, min(batch_size, int(budget // max(3 * per_sample, 1))))


def probe(model: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet, reads: list[str] = ()) -> Probe:
    feed, _ = next(data.take(np.zeros(1, dtype=int)).batches(1))
    names = [o.name for o in model.graph.output] + _wanted(model, targets) + list(reads)
    names = [n for n in dict.fromkeys(names) if n not in feed]
    values = session(with_outputs(model, names)).run(names, feed)
    return Probe(sum(v.nbytes for v in feed.values()), {n: v.nbytes for n, v in zip(names, values)})


class PassReader(Protocol):
    """What a later stage reads in the calibration pass beside the statistics (compensation: the
    original layers' outputs on its folds): `reads`, the tensors it wants; sized to the run batch
    and the probe (`plan`), it names the `parts` of the set (positions) it reads them on, which
    the pass runs first, each in runs of its own, handing each run's values to `visit`."""

    reads: list[str]
    parts: list[np.ndarray]

    def plan(self, batch: int, measured: Probe) -> None: ...

    def visit(self, part: int, values: dict[str, np.ndarray], count: int, mask: np.ndarray | None) -> None: ...


def capture_within(model: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet, batch_size: int,
                   max_memory: int, seed: int = 0, reader: PassReader | None = None
                   ) -> tuple[dict[str, "LayerStats"], list[np.ndarray], int]:
    """`capture` within --max-memory: a run's tensors sized to an eighth of it (Probe), the
    statistics to a third. Also the batch the runs took."""
    measured = probe(model, targets, data, reader.reads if reader is not None else ())
    batch = measured.batch_within(batch_size, max_memory // 8)
    if reader is not None:
        reader.plan(batch, measured)
    stats, outputs = capture(model, targets, data, batch, seed=seed, stats_budget=max_memory // 3, reader=reader)
    return stats, outputs, batch


def _wanted(model: onnx.ModelProto, targets: list[LayerTarget]) -> list[str]:
    """The targets' inputs that are not graph inputs or outputs already."""
    present = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    return list(dict.fromkeys(n for n in (t.activation for t in targets) if n not in present))


def statistics_bytes(stats: dict[str, LayerStats]) -> int:
    return sum(s.nbytes for s in stats.values())


def capture(model: onnx.ModelProto, targets: list[LayerTarget], data: CalibrationSet,
            batch_size: int = 64, keep: int = 1024, seed: int = 0, stats_budget: int | None = None,
            reader: PassReader | None = None) -> tuple[dict[str, LayerStats], list[np.ndarray]]:
    """Statistics per target name, and the model's own outputs over `data`, from one pass over
    it; with `reader`, what it reads on its parts handed to it on the way. Each layer samples
    `row_budget` input rows over the whole set, spread over the batches, so the cost does not
    grow with the images' size. Statistics that would take more than `stats_budget` bytes are
    refused before they are allocated (OutOfMemory, naming the widest layers)."""
    rng = np.random.default_rng(seed)
    parts = list(reader.parts) if reader is not None else []
    rest = np.setdiff1d(np.arange(len(data)), np.concatenate(parts)) if parts else np.arange(len(data))
    segments = [(k, data.take(p)) for k, p in enumerate(parts)] + ([(None, data.take(rest))] if len(rest) else [])
    batches = sum(-(-len(part) // part.batch_for(batch_size)) for _, part in segments)
    outputs = [o.name for o in model.graph.output]
    wanted = _wanted(model, targets)
    reads = list(reader.reads) if reader is not None else []
    sess = session(with_outputs(model, wanted + reads))

    stats: dict[str, LayerStats] = {}
    results: list[list[tuple[np.ndarray, int]]] = [[] for _ in outputs]
    for k, part in segments:
        names = list(dict.fromkeys(outputs + wanted + (reads if k is not None else [])))
        for feed, count in part.batches(batch_size):
            mask = token_mask(feed)
            values = dict(zip(names, sess.run(names, feed)))
            values.update(feed)
            if k is not None:
                reader.visit(k, values, count, mask)
            for store, name in zip(results, outputs):
                store.append((without_padding(values[name], mask), count))
            if not stats and stats_budget is not None:
                _check_budget(targets, values, count, len(data), keep, stats_budget)
            _accumulate(stats, targets, values, part, count, mask, rng, batches, keep)
    joined = [data.join(r) for r in results]
    if parts:  # the parts ran first: the outputs back in the set's order
        order = np.argsort(np.concatenate([*parts, rest]))
        joined = [o[order] if o.ndim and len(o) == len(order) else o for o in joined]
    return stats, joined


def _accumulate(stats: dict[str, LayerStats], targets: list[LayerTarget], values: dict[str, np.ndarray],
                data: CalibrationSet, count: int, mask: np.ndarray | None, rng: np.random.Generator,
                batches: int, keep: int) -> None:
    """One run's rows added to every target's statistics (`batches`: the runs of the pass)."""
    for t in targets:
        x = values[t.activation]
        if not t.inputs_in_columns:
            x = data.own(x, count)
        budget = row_budget(t)
        real = real_tokens(x, mask, t)
        rows = patches(x if real is None else x[real], t.layer, rng, -(-budget // batches), t.inputs_in_columns)
        keys = rng.random(len(rows))
        s = stats.get(t.name)
        if s is None:
            g, d = rows.shape[1], rows.shape[-1]
            # one sample's input: Gemm's transposed A has its samples along axis 1
            one = x.shape[:1] + (1,) if t.op_type == "Gemm" and t.inputs_in_columns else (1,) + x.shape[1:]
            # the rows the whole set will give, at this batch's rate, against the width: fewer,
            # and the shrinkage keeps only the diagonal (LayerStats)
            expected = min(budget, len(rows) * batches)
            moment = np.zeros((g, d) if expected <= d else (g, d, d))
            s = stats[t.name] = LayerStats(moment, 0, _in_spatial(t, x), one, rows[:0], keys[:0], t.layer.is_conv)
        flat = rows.transpose(1, 0, 2)  # (groups, rows, d): float32 BLAS, float64 sums
        if s.diagonal:
            s.moment_sum += np.sum(np.square(flat, dtype=np.float64), axis=1)
        elif len(flat) == 1:  # the upper triangle only (BLAS syrk): half the work of the product;
            # of the Fortran-ordered transpose, which BLAS takes without the copy trans=1 would make
            s.moment_sum[0] += ssyrk(1.0, flat[0].T, trans=0)
        else:
            s.moment_sum += np.triu(np.matmul(flat.transpose(0, 2, 1), flat))
        s.rows += len(rows)
        if keep:
            # a uniform sample of everything seen: keep the rows with the smallest random keys
            merged, merged_keys = np.concatenate([s.sample, rows]), np.concatenate([s.sample_keys, keys])
            order = np.argsort(merged_keys)[:keep]
            s.sample, s.sample_keys = merged[order], merged_keys[order]


def real_tokens(x: np.ndarray, mask: np.ndarray | None, target: LayerTarget) -> np.ndarray | None:
    """Where a dense layer's (batch, sequence, width) input is at real tokens, or None (take all).
    Padding positions are computed and then ignored (masked out of attention and pooling): real
    sentences padded to 128 tokens are 77% padding, and whitening by those vectors would fit the
    factors to what the model throws away."""
    if mask is None or target.layer.is_conv or target.inputs_in_columns or x.ndim != 3:
        return None
    mask = mask[:len(x)]  # a fixed batch's filled-up repeats were cut from x
    return mask if x.shape[:2] == mask.shape and mask.any() else None


def _check_budget(targets: list[LayerTarget], values: dict[str, np.ndarray], count: int, samples: int,
                  keep: int, budget: int) -> None:
    """What every layer's statistics will take (LayerStats: the full moment only where more rows
    than its width will be seen), from the first batch, against `budget`."""
    need = {}
    for t in targets:
        x = values[t.activation]
        d, g = input_width(t), t.layer.groups
        per_sample = (x.size / max(d * g, 1) if not t.layer.is_conv else
                      len(x) * int(np.prod(t.layer.geometry.out_size(x.shape[2:])))) / max(count, 1)
        rows = min(row_budget(t), per_sample * samples)
        need[t.name] = 8 * g * d * (d if rows > d else 1) + 4 * min(keep, rows) * g * d
    total = sum(need.values())
    if total > budget:
        widest = sorted(need, key=lambda n: -need[n])[:3]
        raise OutOfMemory(f"the layers' input statistics need {total / 2**30:.1f} GiB, more than the "
                          f"{budget / 2**30:.1f} GiB --max-memory leaves them (widest: "
                          + ", ".join(f"{n} {need[n] / 2**30:.2f} GiB" for n in widest)
                          + "); give a larger --max-memory or --exclude the widest layers")


def _in_spatial(target: LayerTarget, x: np.ndarray) -> tuple[int, ...]:
    if target.op_type == "Conv":
        return tuple(x.shape[2:])
    if target.op_type == "Gemm":
        return (1,)
    if target.weight_side == "right":
        return (int(np.prod(x.shape[1:-1])),)
    return (int(x.shape[-1] * np.prod(x.shape[1:-2])),)
