"""Model quality, measured end to end in onnxruntime: what `--eps` bounds.

- accuracy  (labels given): the drop in top-1 accuracy, 0.005 = half a point (001's EPS);
- agreement (no labels, classifier-shaped output): the fraction of samples whose top-1 changes;
- cosine    (other outputs): 1 - mean cosine similarity per sample, the worst output counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .calibration.data import CalibrationSet

METRICS = ("auto", "accuracy", "agreement", "cosine")


def session(model: onnx.ModelProto | bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # idle threads sleep instead of spinning: on a machine shared with other work (or with our own
    # numpy between runs) spinning threads steal the cores the work needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto | ort.InferenceSession, data: CalibrationSet, batch_size: int = 64,
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """The named outputs (default: the graph's) over the whole set, batch by batch."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in data.batches(batch_size):
        for store, value in zip(parts, sess.run(names, feed)):
            store.append(value)
    return [np.concatenate(p) for p in parts]


def is_classifier(outputs: list[np.ndarray]) -> bool:
    return len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1


def resolve_metric(metric: str, reference: list[np.ndarray], labels: np.ndarray | None) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if metric == "accuracy" and labels is None:
        raise ValueError("--metric accuracy needs labels (--labels)")
    if metric in ("accuracy", "agreement") and not is_classifier(reference):
        raise ValueError(f"--metric {metric} needs one (samples, classes) output")
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
    if metric == "accuracy":
        before = float(np.mean(reference[0].argmax(1) == labels))
        after = float(np.mean(outputs[0].argmax(1) == labels))
        return Quality(metric, after, before - after)
    if metric == "agreement":
        agree = float(np.mean(reference[0].argmax(1) == outputs[0].argmax(1)))
        return Quality(metric, agree, 1.0 - agree)
    worst = 1.0
    for ref, out in zip(reference, outputs):
        a = ref.reshape(len(ref), -1).astype(np.float64)
        b = out.reshape(len(out), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)
        worst = min(worst, float(np.mean(cos)))
    return Quality(metric, worst, 1.0 - worst)
