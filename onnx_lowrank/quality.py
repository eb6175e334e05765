"""Model quality, measured end to end in onnxruntime: what `--eps` bounds.

- accuracy  (labels given): the drop in top-1 accuracy, 0.005 = half a point (001's EPS);
- agreement (no labels, classifier-shaped output): the fraction of samples whose top-1 changes;
- cosine    (other outputs): 1 - mean cosine similarity per sample, the worst output counting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from .calibration.data import CalibrationSet
from .errors import first_line

METRICS = ("auto", "accuracy", "agreement", "cosine")


# what onnxruntime raises on a model it cannot load or run (plain Exceptions, not RuntimeError)
RUNTIME_ERRORS = tuple(getattr(_state, name) for name in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel", "NotImplemented",
    "RuntimeException", "EPFail", "EngineError", "NotFound", "ModelRequiresCompilation", "DeviceReset",
    "ModelLoaded", "ModelLoadCanceled") if hasattr(_state, name))


def runtime_message(error: Exception) -> str:
    """The first line of onnxruntime's message, without its "[ONNXRuntimeError] : 1 : FAIL : "."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(error))


def session(model: onnx.ModelProto | bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: a failed run reaches the user once, as our error line
    # idle threads sleep instead of spinning: on a machine shared with other work (or with our own
    # numpy between runs) spinning threads steal the cores the work needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no arena: it keeps the largest batch's buffers for the session's life, and the converter
    # holds several sessions (measured on VGG-16 at 224^2: the arena's growth was GBs of the peak)
    options.enable_cpu_mem_arena = False
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto | ort.InferenceSession, data: CalibrationSet, batch_size: int = 64,
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """The named outputs (default: the graph's) over the whole set, in the batches the model takes."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    runs: list[list[tuple[np.ndarray, int]]] = [[] for _ in names]
    for feed, count in data.batches(batch_size):
        for store, value in zip(runs, sess.run(names, feed)):
            store.append((value, count))
    return [data.join(r) for r in runs]


def is_classifier(outputs: list[np.ndarray]) -> bool:
    return len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1


def resolve_metric(metric: str, reference: list[np.ndarray], labels: np.ndarray | None) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if metric == "accuracy" and labels is None:
        raise ValueError("--metric accuracy needs labels (--labels)")
    if metric in ("accuracy", "agreement") and not is_classifier(reference):
        raise ValueError(f"--metric {metric} needs one (samples, classes) output")
    if labels is not None and is_classifier(reference):
        classes = reference[0].shape[1]
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"labels must be class indices 0..{classes - 1} (the model has {classes} outputs); "
                             f"got {labels.min()}..{labels.max()}")
    if metric != "auto":
        return metric
    if labels is not None and is_classifier(reference):
        return "accuracy"
    return "agreement" if is_classifier(reference) else "cosine"


@dataclass(frozen=True)
class Quality:
    """A model's quality on one data set under one metric, and its drop from the reference."""

    metric: str
    value: float   # accuracy, or agreement / mean cosine with the original
    drop: float


def quality(metric: str, reference: list[np.ndarray], outputs: list[np.ndarray],
            labels: np.ndarray | None) -> Quality:
    # drops from sample counts, as DropMeter takes them: a difference of two means can land a
    # rounding error above an eps that the count meets exactly (0.98889 - 0.96889 > 0.02)
    n = len(labels if metric == "accuracy" else reference[0])
    if metric == "accuracy":
        before = int(np.sum(reference[0].argmax(1) == labels))
        after = int(np.sum(outputs[0].argmax(1) == labels))
        return Quality(metric, after / n, (before - after) / n)
    if metric == "agreement":
        agree = int(np.sum(reference[0].argmax(1) == outputs[0].argmax(1)))
        return Quality(metric, agree / n, (n - agree) / n)
    worst = min(float(np.mean(_cosines(ref, out))) for ref, out in zip(reference, outputs))
    return Quality(metric, worst, 1.0 - worst)


class DropMeter:
    """The drop of candidate models against the original on one data set, for searches that only
    need to know whether it is within eps. Samples run fragile first (smallest margin between the
    original's top two classes: they flip first), in growing chunks, and a run stops as soon as
    the drop is certain to exceed eps whatever the rest would give; the value returned is then a
    lower bound, and `exact` says which. A failing model typically stops after one small chunk."""

    FIRST_CHUNK = 16

    def __init__(self, metric: str, data: CalibrationSet, reference: list[np.ndarray], eps: float,
                 batch_size: int = 64) -> None:
        self.metric, self.eps, self.batch_size = metric, eps, batch_size
        order = np.arange(len(data))
        if metric in ("accuracy", "agreement"):
            top2 = np.sort(reference[0], axis=1)[:, -2:]
            order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")
        self.data = data.take(order)
        self.reference = [r[order] for r in reference]
        self.labels = self.data.labels
        self.n = len(self.data)
        self.exact = True

    def __call__(self, model: onnx.ModelProto | ort.InferenceSession) -> float:
        sess = model if isinstance(model, ort.InferenceSession) else session(model)
        names = [o.name for o in sess.get_outputs()]
        lost = 0.0                       # sum over the samples seen of what each adds to the drop
        per_output = np.zeros(len(names))  # cosine: sum of 1 - cos per output
        start, size = 0, self.FIRST_CHUNK
        while start < self.n:
            stop = min(self.n, start + size)
            chunk = self.data.take(np.arange(start, stop))
            outs = predict(sess, chunk, self.batch_size, names)
            ref = [r[start:stop] for r in self.reference]
            if self.metric == "accuracy":
                y = self.labels[start:stop]
                lost += float(np.sum(ref[0].argmax(1) == y) - np.sum(outs[0].argmax(1) == y))
                # the rest can at most win back the samples the original gets wrong
                rest_wrong = float(np.sum(self.reference[0][stop:].argmax(1) != self.labels[stop:]))
                bound = (lost - rest_wrong) / self.n
            elif self.metric == "agreement":
                lost += float(np.sum(ref[0].argmax(1) != outs[0].argmax(1)))
                bound = lost / self.n
            else:
                per_output += [float(np.sum(1 - _cosines(r, o))) for r, o in zip(ref, outs)]
                bound = float(per_output.max()) / self.n
            start, size = stop, 2 * size
            if bound > self.eps and start < self.n:
                self.exact = False
                return bound
        self.exact = True
        return float(per_output.max()) / self.n if self.metric == "cosine" else lost / self.n


def _cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per sample. Two (numerically) zero vectors agree (1); a zero against a non-zero one does
    not (0): a model whose output went to zero everywhere (the PP-OCR detector with every layer at
    rank 1) is not a perfect match. Zero is a norm below 1e-6 of the largest one in the call: the
    original's sigmoid of -40 is 0.0 where its BatchNorm-folded form gives 4e-18."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    tol = 1e-6 * max(float(na.max(initial=0.0)), float(nb.max(initial=0.0)))
    za, zb = na <= tol, nb <= tol
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300)
    return np.where(~za & ~zb, cos, np.where(za & zb, 1.0, 0.0))
