"""`onnx-lowrank bench ORIG COMP`: two models side by side, the way a deployment sees them:
parameters, MACs, file size, latency in onnxruntime per batch size, and the quality drop when
data is given. The two sessions run interleaved (one run of each in turn) so that a noisy,
shared machine slows both alike and the speedup stays meaningful."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration.data import load_calibration
from .graph import load_model, node_costs
from .latency import interleaved, random_feed, runtime_session
from .quality import predict, quality, resolve_metric

@dataclass
class Latency:
    batch: int
    median: tuple[float, float]  # seconds per run: original, compressed
    min: tuple[float, float]
    max: tuple[float, float]
    runs: int

    @property
    def speedup(self) -> float:
        return self.median[0] / self.median[1]


@dataclass
class BenchResult:
    models: tuple[str, str]
    provider: str
    threads: int
    params: tuple[int, int]
    macs: tuple[int, int]          # per sample
    file_size: tuple[int, int]
    latency: list[Latency] = field(default_factory=list)
    metric: str | None = None      # with data: what the drop is of
    quality: tuple[float, float] | None = None
    drop: float | None = None
    samples: int | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, lat in zip(data["latency"], self.latency):
            entry["speedup"] = lat.speedup
        return data


def bench(original: str | os.PathLike, compressed: str | os.PathLike, batches: tuple[int, ...] = (1,),
          provider: str = "CPUExecutionProvider", threads: int = 0, calibration: Any = None,
          labels: Any = None, metric: str = "auto", min_seconds: float = 1.0) -> BenchResult:
    from .pipeline import model_params

    models = [load_model(original), load_model(compressed)]
    data = load_calibration(calibration, models[0], labels) if calibration is not None else None
    feed = data.sample_feed() if data is not None else None
    macs = tuple(sum(c.macs for c in node_costs(m, feed=feed)) for m in models)
    result = BenchResult((str(original), str(compressed)), provider, threads,
                         tuple(model_params(m) for m in models), macs,
                         tuple(Path(p).stat().st_size for p in (original, compressed)))
    sessions = [runtime_session(m, provider, threads) for m in models]
    for batch in batches:
        if data is not None:
            take = np.arange(batch) % len(data)  # the first samples, repeated if there are fewer
            feed, _ = next(data.take(take).batches(batch))  # in the batch the model takes, if it fixes one
        else:
            feed = random_feed(sessions[0], batch)
        times = interleaved(sessions, feed, min_seconds=min_seconds)
        result.latency.append(Latency(batch, tuple(float(np.median(t)) for t in times),
                                      tuple(float(np.min(t)) for t in times),
                                      tuple(float(np.max(t)) for t in times), len(times[0])))
    if data is not None:
        outputs = [predict(s, data) for s in sessions]
        resolved = resolve_metric(metric, outputs[0], data.labels)
        result.metric = str(resolved)
        before = quality(resolved, outputs[0], outputs[0], data.labels)
        after = quality(resolved, outputs[0], outputs[1], data.labels)
        result.quality, result.drop, result.samples = (before.value, after.value), after.drop, len(data)
    return result
