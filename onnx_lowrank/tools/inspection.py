"""What `inspect` shows per layer: which methods apply and how far the layer compresses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..calibration.capture import LayerStats, capture_within, statistics_bytes
from ..calibration.data import input_layout, load_calibration
from ..decompositions import METHODS, reason_not_applicable
from ..graph.targets import LayerTarget
from ..selection.candidates import AUTO_METHODS, build_problems

INSPECT_SAMPLES = 256


@dataclass
class Compressibility:
    methods: list[str]
    reason: str | None
    macs: int | None
    at_10: str   # "0.23 tucker2" or "-"
    at_30: str


def _identity_stats(t: LayerTarget) -> LayerStats:
    """Inputs with an identity second moment, kept as its diagonal: output errors are then weight
    errors."""
    d = t.layer.in_per_group * int(np.prod(t.layer.kernel))
    shape = (1,) + tuple(t.input_shape[1:]) if t.input_shape else ()
    return LayerStats(np.ones((t.layer.groups, d)), 1, t.in_spatial or (1,) * max(len(t.layer.kernel), 1), shape,
                      np.zeros((0, t.layer.groups, d), np.float32), np.zeros(0), t.layer.is_conv)


def how_run(model: onnx.ModelProto, calib) -> tuple[dict, object]:
    """The report's calibration and memory entries for `model` on `calib` (None: the declared
    inputs only), and the calibration set (or None)."""
    if calib is None:
        return {"inputs": input_layout(model)}, None
    data = load_calibration(calib, model)
    return {"inputs": input_layout(model, data)}, data


def compressibility(model: onnx.ModelProto, targets: list[LayerTarget], calib, batch_size: int,
                    max_memory: int = 12 * 2**30) -> tuple[list[Compressibility], dict]:
    """Per target, its compressibility; and how the model ran (the report's calibration and
    memory entries: its inputs, the run batch, the statistics' bytes)."""
    factorable = [t for t in targets if any(reason_not_applicable(t.layer, m) is None for m in AUTO_METHODS)]
    how, data = how_run(model, calib)
    if data is not None:
        data = data.take(np.arange(min(INSPECT_SAMPLES, len(data))))
        stats, _, batch = capture_within(model, factorable, data, batch_size, max_memory)
        how.update(run_batch=data.batch_for(batch), memory={"max_memory": max_memory,
                                                              "statistics_bytes": statistics_bytes(stats)})
    else:
        stats = {t.name: _identity_stats(t) for t in factorable}
    problems = dict(zip(stats, build_problems([t for t in factorable if t.name in stats], stats, AUTO_METHODS,
                                              "macs", calib is not None)))
    rows = []
    for t in targets:
        methods = [m for m in METHODS if reason_not_applicable(t.layer, m) is None]
        if t.name not in stats:
            rows.append(Compressibility(methods, reason_not_applicable(t.layer, "svd"), t.macs(), "-", "-"))
            continue
        problem = problems[t.name]

        def cheapest(err: float) -> str:
            fits = [c for c in problem.candidates if c.error <= err]
            best = min(fits, key=lambda c: c.cost)
            return "1.00 (keep)" if not best.factored else f"{best.cost / problem.base_cost:.2f} {best.method}"

        rows.append(Compressibility(methods, None, int(problem.base_cost), cheapest(0.1), cheapest(0.3)))
    return rows, how
