"""How onnxruntime's kernels take a factor chain's width: why `--quantize int8` rounds ranks to
multiples of 8 (config.INT8_RANK_MULTIPLE).

    .venv/bin/python benchmarks/int8_widths.py [--widths 8,12,13,...] [--threads 1]

One factor chain as the converter writes it for a 3x3 conv of the default model's blocks.0.conv1
(32 -> 64 channels, 28x28 input, stride 2): a 3x1 conv to r channels, then a 1x3 conv to 64, ReLU.
Weights and inputs are N(0, 1) (only the time is measured). Each width is timed in float and
after onnxruntime's quantize_static (QDQ, per channel, uint8 activations, int8 weights, as
benchmarks/quantize.py quantizes), at batch 32. All sessions run in turn (latency.interleaved),
so the machine's load falls on every width alike; medians.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from calibration_sets import Reader
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from onnx_lowrank.runtime.latency import interleaved
from onnx_lowrank.runtime.sessions import session

IN_CHANNELS, OUT_CHANNELS, SIDE, BATCH = 32, 64, 28, 32


def chain(width: int, rng: np.random.Generator) -> onnx.ModelProto:
    first = numpy_helper.from_array(rng.standard_normal((width, IN_CHANNELS, 3, 1)).astype(np.float32), "w1")
    second = numpy_helper.from_array(rng.standard_normal((OUT_CHANNELS, width, 1, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 0, 1, 0], strides=[2, 1]),
             helper.make_node("Conv", ["h", "w2"], ["z"], pads=[0, 1, 0, 1], strides=[1, 2]),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", 1, ["batch", IN_CHANNELS, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", 1, None)], [first, second])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed onnxruntime's quantizer loads
    return model


def quantized(model: onnx.ModelProto, x: np.ndarray, folder: Path) -> onnx.ModelProto:
    src, dst = folder / "float.onnx", folder / "int8.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Reader("x", x), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(dst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="8,12,13,14,15,16,17,20,24,25,28,32,33,48,53,64")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, IN_CHANNELS, SIDE, SIDE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        models = {w: chain(w, rng) for w in widths}
        sessions = {(w, "float"): session(m, "deploy", args.threads) for w, m in models.items()}
        sessions |= {(w, "int8"): session(quantized(m, x, Path(tmp)), "deploy", args.threads)
                     for w, m in models.items()}
    times = dict(zip(sessions, interleaved(list(sessions.values()), {"x": x}, min_runs=40, min_seconds=20.0)))
    table = Table(title=f"a factor chain {IN_CHANNELS} -> r -> {OUT_CHANNELS} at {SIDE}x{SIDE}, batch {BATCH}, "
                        f"{args.threads} thread(s): median ms per run")
    for col in ("r", "MACs (M)", "float ms", "int8 ms", "int8 vs r rounded up to a multiple of 4"):
        table.add_column(col, justify="right")
    int8 = {w: 1e3 * float(np.median(times[w, "int8"])) for w in widths}
    for w in widths:
        up = -(-w // 4) * 4
        macs = BATCH * (SIDE // 2) * SIDE * w * IN_CHANNELS * 3 + BATCH * (SIDE // 2) ** 2 * OUT_CHANNELS * w * 3
        against = f"{int8[w] / int8[up]:.2f}x the time of r={up}" if up != w and up in int8 else ""
        table.add_row(str(w), f"{macs / 1e6:.1f}", f"{1e3 * float(np.median(times[w, 'float'])):.3f}", f"{int8[w]:.3f}",
                      against)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
