"""The trained MNIST CNN in each exporter's shape (tests/exporter_models.py) converted at eps 0.01
on 300 MNIST test images: what each shape compresses to, which layers are factored and which are
skipped and why. The README's "Supported models" table.

    .venv/bin/python benchmarks/exporters.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import exporter_models as em  # noqa: E402
from helpers import mnist_test_images  # noqa: E402
from test_exporters import feeds_for  # noqa: E402

from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.pipeline import compress_file  # noqa: E402

EPS = 0.01


def variants(net: em.Net) -> dict[str, onnx.ModelProto]:
    return {
        "PyTorch legacy, opset 11": em.pytorch(net, 11),
        "PyTorch legacy, opset 17": em.pytorch(net, 17),
        "PyTorch dynamo, opset 21 (BN nodes)": em.pytorch(net, 21, dynamo=True),
        "tf2onnx NHWC + Keras dense": em.tf2onnx_nhwc(net),
        "weights in Constant nodes": em.constant_nodes(net),
        "dynamic batch, H, W": em.dynamic_hw(net),
        "float16, float32 I/O (Casts)": em.float16(net, keep_io_types=True),
        "float16 I/O": em.float16(net, keep_io_types=False),
        "2 inputs, 3 outputs": em.multi_io(net),
        "Concat joins": em.concat_blocks(net),
        "head inside If": em.if_head(net),
        "conv inside Loop": em.loop_block(net),
        "QDQ-quantized convs": em.qdq(net),
    }


def main() -> None:
    warnings.simplefilter("ignore")
    x, y = mnist_test_images(300)
    table = Table(title=f"exporter shapes of the MNIST CNN, eps {EPS}, 300 MNIST test images")
    for col in ("model", "MACs", "params", "metric", "held-out drop", "factored", "skipped (reason)"):
        table.add_column(col, overflow="fold")
    for name, model in variants(em.trained_net()).items():
        with tempfile.TemporaryDirectory() as tmp:
            src, calib = Path(tmp) / "in.onnx", Path(tmp) / "calib.npz"
            onnx.save(model, src)
            classifier = len(model.graph.output) == 1
            np.savez(calib, **feeds_for(model, x), **({"labels": y} if classifier else {}))
            r = compress_file(src, Path(tmp) / "out.onnx", CompressConfig(eps=EPS), str(calib),
                              "labels" if classifier else None)
        reasons = sorted({s["reason"] for s in r.skipped})
        table.add_row(name, f"{r.mac_ratio:.2f}x", f"{r.param_ratio:.2f}x", r.metric, f"{r.drop:.4f}",
                      f"{sum(layer.method is not None for layer in r.layers)} of {len(r.layers)}",
                      f"{len(r.skipped)}: " + "; ".join(reasons) if r.skipped else "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
