"""`onnx-lowrank bench ORIG COMP [COMP ...]`: models side by side, the way a deployment sees them
(a float and an int8 result beside their original, for one): parameters, MACs, file size,
latency in onnxruntime per batch size, and each one's quality drop against ORIG when data is
given. The sessions run interleaved (latency.interleaved: a block of runs of each in turn) so
that a noisy, shared machine slows all alike and the speedups stay meaningful."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration.data import load_calibration
from ..graph import load_model
from ..graph.outputs import output_layouts
from ..metrics.quality import quality, resolve_metric
from ..runtime.latency import interleaved, random_feed
from ..runtime.sessions import costs_at, measuring_batch, predict, session

@dataclass
class Latency:
    batch: int
    median: tuple[float, ...]  # seconds per run: the original, then each compressed model
    min: tuple[float, ...]
    max: tuple[float, ...]
    runs: int

    @property
    def speedup(self) -> list[float]:
        """Each compressed model's, against the original."""
        return [self.median[0] / m for m in self.median[1:]]


@dataclass
class BenchResult:
    models: tuple[str, ...]        # the original first
    provider: str
    threads: int
    params: tuple[int, ...]
    macs: tuple[int, ...]          # per sample
    file_size: tuple[int, ...]
    latency: list[Latency] = field(default_factory=list)
    metric: str | None = None      # with data: what the drops are of
    quality: tuple[float, ...] | None = None
    drop: list[float] | None = None  # each compressed model's against the original
    samples: int | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, lat in zip(data["latency"], self.latency):
            entry["speedup"] = lat.speedup
        return data


def bench(original: str | os.PathLike, *compressed: str | os.PathLike, batches: tuple[int, ...] = (1,),
          provider: str = "CPUExecutionProvider", threads: int = 0, calibration: Any = None,
          labels: Any = None, metric: str = "auto", min_seconds: float = 1.0) -> BenchResult:
    from ..pipeline.stages import model_params

    paths = (original, *compressed)
    models = [load_model(p) for p in paths]
    data = load_calibration(calibration, models[0], labels) if calibration is not None else None
    feed = data.sample_feed() if data is not None else None
    macs = tuple(sum(c.macs for c in costs_at(m, feed)) for m in models)
    result = BenchResult(tuple(str(p) for p in paths), provider, threads, tuple(model_params(m) for m in models), macs,
                         tuple(Path(p).stat().st_size for p in paths))
    sessions = [session(m, "deploy", threads, provider) for m in models]
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
        outputs = [predict(s, data, measuring_batch(m, 64)) for s, m in zip(sessions, models)]
        resolved = resolve_metric(metric, outputs[0], data.labels, layouts=output_layouts(models[0]))
        result.metric = str(resolved)
        each = [quality(resolved, outputs[0], out, data.labels) for out in outputs]
        result.quality, result.drop, result.samples = tuple(q.value for q in each), [q.drop for q in each[1:]], len(data)
    return result
