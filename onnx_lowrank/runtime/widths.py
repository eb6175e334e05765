"""The channel widths onnxruntime's kernels run fast on this machine, measured: what ranks are
rounded to by default (--rank-multiple's default).

A factor chain's rank is the width of the tensor between its steps. onnxruntime's CPU convs work
on blocks of channels (its NCHWc layout: 16 floats with AVX-512, 8 with AVX2), so a width just
past a multiple of the block runs as slowly as the next multiple: ranks the MAC count alone picks
waste time there (docs/speed.md: a VGG-16-shaped model kept 0.62-0.82 of its MAC ratio as time
with ranks of any width, 0.92-0.99 with ranks in the block). Which block, if any, depends on the
CPU, the provider and the thread count, so it is measured: a two-step chain (a 3x3 conv into
`width` channels, then a 1x1 conv out of them, as a factored conv is) timed at every width up to
PROBE_WIDTH, and the block is the step the times rise in. Measured once per machine and setting,
and cached beside the layer timings."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .latency import default_cache_path, machine_key, read_cache, time_session, write_cache
from .sessions import session

BLOCKS = (2, 4, 8, 16, 32)  # the blocks tried
PROBE_WIDTH = 64            # widths timed: 1 .. PROBE_WIDTH
CHANNELS, SIZE = 64, 28     # the probe chain's outer channels and input size


def probe_chain(width: int, channels: int = CHANNELS, size: int = SIZE) -> onnx.ModelProto:
    """x (1, channels, size, size) -> 3x3 conv into `width` channels -> 1x1 conv back out."""
    rng = np.random.default_rng(width)
    inits = [numpy_helper.from_array(rng.standard_normal((width, channels, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((channels, width, 1, 1)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, f"width {width}", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def chain_times(provider: str = "CPUExecutionProvider", threads: int = 0) -> dict[int, float]:
    """Seconds per run of the probe chain at each width, the fastest of the runs (the least
    disturbed by whatever else the machine does)."""
    feed = {"x": np.random.default_rng(0).standard_normal((1, CHANNELS, SIZE, SIZE)).astype(np.float32)}
    return {w: time_session(session(probe_chain(w), "deploy", threads, provider), feed).min
            for w in range(1, PROBE_WIDTH + 1)}


def block_of(times: dict[int, float]) -> int:
    """The block the times step in: of 1 (time linear in the width) and BLOCKS, the one whose
    step function, time = a + b * ceil(width / block), fits the times best (least squares). On
    this project's AVX-512 machine the probe's times rise by 70% from width 16 to 17 and stay
    within the timer's noise from 17 to 32: block 16 fits them, a linear time does not."""
    widths = np.array(sorted(times))
    t = np.array([times[w] for w in widths])

    def misfit(block: int) -> float:
        x = np.stack([np.ones(len(widths)), np.ceil(widths / block)], axis=1)
        coef, *_ = np.linalg.lstsq(x, t, rcond=None)
        return float(np.sum((x @ coef - t) ** 2))

    return min((1,) + BLOCKS, key=misfit)


def fast_block(provider: str = "CPUExecutionProvider", threads: int = 0, cache=None) -> int:
    """block_of(chain_times(...)) for this machine, provider and thread count, cached on disk."""
    path = default_cache_path() if cache is None else cache
    key = f"width-block|{PROBE_WIDTH}|{provider}|{threads}|{ort.__version__}|{machine_key()}"
    cached = read_cache(path)
    if key not in cached:
        cached = {key: float(block_of(chain_times(provider, threads)))}
        write_cache(path, cached)
    return int(cached[key])
