"""Factorization and INT8 quantization under one eps, measured in one run.

For each model, five versions side by side:
- the original;
- onnxruntime's int8 alone, what a user reaches for first: quant_pre_process, then quantize_static
  (QDQ, per channel, uint8 activations / int8 weights, MinMax) on the model's calibration inputs;
- ours in float (`convert --eps`);
- ours in float, then quantized by hand the same way as the second row (no budget: its drop is
  whatever it is);
- ours `--quantize int8` (the same eps bounds the quantized model);
- ours `--quantize int8 --cost latency --latency-batch 32` (the two MNIST models): the search's
  costs are each layer's and chain's int8 latency at batch 32 and onnxruntime's default threads,
  measured here (a fresh latency cache), instead of MACs.
Quality on inputs no conversion saw: MNIST test[2000:] (8000 digits; the calibration images are
training images) for the default model and the ResNet-18-shaped one, accuracy; MobileNetV2: crops
of photos the calibration never saw (split by photo), top-1 agreement with the original.
Latency: onnxruntime CPU at 1 thread and at 2 (both cores), batch 1 and 32, the five sessions
run in turn (latency.interleaved: blocks of runs of each, over and over, since the machine is
shared; at 2 threads with a pause before each block, so that the session before has stopped
spinning), median. "unfused": quantized Conv/Gemm/MatMul that onnxruntime's optimizer leaves as
DequantizeLinear -> float op.

    .venv/bin/python benchmarks/quantize.py [--models mnist_cnn,resnet18_mnist,mobilenet_v2]
    (make bench-models first: it builds the ResNet and MobileNetV2)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from data import MODELS, mnist, photo_crops, photo_names
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from rich.console import Console
from rich.table import Table

from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress_file
from onnx_lowrank.quantization.int8 import unfused
from onnx_lowrank.runtime.latency import interleaved
from onnx_lowrank.runtime.sessions import predict, session

BATCHES = (1, 32)
LATENCY = "ours --quantize int8 --cost latency"
THREADS = (1, 2)


def setups(folder: Path, names: list[str]) -> list[dict]:
    out = []
    _, _, (x, y) = mnist()
    digits = dict(inputs={"image": x[2000:]}, labels=y[2000:], calib=MODELS / "mnist_calib.npz", label_key="labels",
                  eps=0.005, unseen="MNIST test[2000:], accuracy", latency=True)
    if "mnist_cnn" in names:
        out.append(dict(name="mnist_cnn", path=MODELS / "mnist_cnn.onnx", **digits))
    if "resnet18_mnist" in names:
        out.append(dict(name="resnet18_mnist", path=MODELS / "resnet18_mnist.onnx", **digits))
    if "mobilenet_v2" in names:
        photos = photo_names()
        judged = photos[::4]  # 4 of the 13 photos only judge
        calib = folder / "photos.npz"
        np.savez(calib, input=photo_crops(32, seed=0, names=[p for p in photos if p not in judged]))
        out.append(dict(name="mobilenet_v2", path=MODELS / "mobilenet_v2.onnx", calib=calib, label_key=None,
                        inputs={"input": photo_crops(64, seed=1, names=judged)}, labels=None, eps=0.01,
                        unseen=f"64 crops of each of {', '.join(judged)} (photos never calibrated on), "
                               "top-1 agreement with the original", latency=False))
    return out


def ort_int8(src: Path, dst: Path, calib: Path, folder: Path) -> None:
    """onnxruntime's own recipe: pre-processing, then static QDQ per channel on every calibration input."""
    data = np.load(calib)
    inputs = [k for k in data.files if k != "labels"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(data[inputs[0]])
            self.runs = iter([{k: data[k][i:i + 32] for k in inputs} for i in range(0, n, 32)])

        def get_next(self):
            return next(self.runs, None)

    pre = folder / f"{dst.stem}.pre.onnx"
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist_cnn,resnet18_mnist,mobilenet_v2")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-bias notes
    warnings.simplefilter("ignore")
    console = Console(width=250)
    table = Table(title="INT8 and factorization under one eps (onnxruntime CPU; quality on unseen inputs)")
    for col in ("model", "version", "eps", "unseen quality", "drop", "MACs", "1 thread: b1 ms", "b32 ms",
                "vs ORT int8 b1 / b32", "2 threads: b1 ms", "b32 ms", "vs ORT int8 b1 / b32", "file MB", "smaller",
                "unfused", "convert"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["ONNX_LOWRANK_CACHE"] = str(folder)  # every latency measured in this run
        for s in setups(folder, args.models.split(",")):
            paths = {"original": s["path"], "ORT int8 alone": folder / f"{s['name']}.ort_int8.onnx",
                     "ours float": folder / f"{s['name']}.ours.onnx",
                     "ours float, then ORT int8": folder / f"{s['name']}.ours_int8_by_hand.onnx",
                     "ours --quantize int8": folder / f"{s['name']}.ours_quantized.onnx"}
            configs = {"ours float": CompressConfig(eps=s["eps"]),
                       "ours --quantize int8": CompressConfig(eps=s["eps"], quantize="int8")}
            if s["latency"]:
                paths[LATENCY] = folder / f"{s['name']}.ours_quantized_latency.onnx"
                configs[LATENCY] = CompressConfig(eps=s["eps"], quantize="int8", cost="latency", latency_batch=32)
            ort_int8(s["path"], paths["ORT int8 alone"], s["calib"], folder)
            reports, seconds = {}, {}
            for version, config in configs.items():
                start = time.perf_counter()
                reports[version] = compress_file(s["path"], paths[version], config, str(s["calib"]), s["label_key"])
                seconds[version] = time.perf_counter() - start
            ort_int8(paths["ours float"], paths["ours float, then ORT int8"], s["calib"], folder)
            models = {v: onnx.load(str(p)) for v, p in paths.items()}
            unseen = CalibrationSet(s["inputs"])
            top1 = {v: predict(m, unseen, 64)[0].argmax(1) for v, m in models.items()}
            truth = s["labels"] if s["labels"] is not None else top1["original"]
            score = {v: float(np.mean(t == truth)) for v, t in top1.items()}
            latency = {}
            for threads in THREADS:
                sessions = [session(m, "deploy", threads) for m in models.values()]
                for batch in BATCHES:
                    feed = {k: v[:batch] for k, v in s["inputs"].items()}
                    for v, t in zip(models, interleaved(sessions, feed, min_runs=60, min_seconds=3.0)):
                        latency[v, threads, batch] = float(np.median(t)) * 1e3
            size = {v: p.stat().st_size / 1e6 for v, p in paths.items()}
            for v in models:
                timed = []
                for threads in THREADS:
                    timed += [f"{latency[v, threads, 1]:.3f}", f"{latency[v, threads, 32]:.2f}", " / ".join(
                        f"{latency['ORT int8 alone', threads, b] / latency[v, threads, b]:.2f}x" for b in BATCHES)]
                report = reports.get(v)
                macs = f"{report.mac_ratio:.2f}x" if report else ("1.00x" if "ours" not in v else
                                                                   f"{reports['ours float'].mac_ratio:.2f}x")
                table.add_row(s["name"], v, str(s["eps"]) if report else "", f"{score[v]:.4f}",
                              f"{score['original'] - score[v]:+.4f}", macs, *timed, f"{size[v]:.2f}",
                              f"{size['original'] / size[v]:.1f}x",
                              "" if v in ("original", "ours float") else str(len(unfused(models[v]))),
                              f"{seconds[v]:.0f} s" if v in seconds else "")
            for version in ("ours --quantize int8", LATENCY):
                q = reports.get(version)
                if q is None:
                    continue
                console.print(f"{s['name']}, {version}: unseen = {s['unseen']}; {q.quantization['mode']}; "
                              f"{q.quantization['int8_layers']} layer(s) int8, {len(q.quantization['float_layers'])} "
                              f"float; held-out drop {q.drop:.4f} (float, same ranks: "
                              f"{q.quantization['float_drop']:.4f}), bound {q.bound:.4f} at {q.confidence:g}, "
                              f"{q.backed_off} back-off step(s)" + "".join(f"\n  warning: {w}" for w in q.warnings),
                              highlight=False)
            if s["name"] == "mnist_cnn":
                console.print(reports["ours --quantize int8"].tables()[0])
    console.print(table)


if __name__ == "__main__":
    main()
