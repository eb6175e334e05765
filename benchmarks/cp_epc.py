"""CP of real conv kernels without and with Phan et al.'s error-preserving correction (EPC): the
approximation error, the sensitivity (Phan et al. Lemma 1) and the largest rank-1 intensity, side by side
per rank. Phan et al. Fig. 2: ALS leaves large, sensitive rank-1 terms; EPC keeps the error and lowers both.

    .venv/bin/python benchmarks/cp_epc.py
"""

from __future__ import annotations

import time

import numpy as np
from real_kernels import digit_cnn_convs
from rich.console import Console
from rich.table import Table

from onnx_lowrank.decompositions import cp

RANKS = (8, 16, 32, 64)


def main() -> None:
    table = Table(title="CP of digit-recognizer CNN kernels: ALS vs ALS + EPC (Phan et al.)")
    for col in ("layer", "kernel", "rank", "error ALS", "error EPC", "sensitivity ALS", "sensitivity EPC",
                "ratio", "max intensity ALS", "max intensity EPC", "EPC time"):
        table.add_column(col, justify="right")
    for name, layer in digit_cnn_convs():
        if layer.in_per_group == 1:
            continue  # the first conv has one input channel: its CP is a matrix factorization
        tensor = cp.to_cp_tensor(layer.weight.astype(np.float64), 3)
        norm = np.linalg.norm(tensor)
        for rank in RANKS:
            als = cp.als(tensor, rank)
            start = time.perf_counter()
            corrected = cp.epc(tensor, als)
            seconds = time.perf_counter() - start
            err = [np.linalg.norm(tensor - cp.cp_to_tensor(f)) / norm for f in (als, corrected)]
            ss = [cp.sensitivity(f) for f in (als, corrected)]
            peak = [cp.intensities(f).max() for f in (als, corrected)]
            table.add_row(name, "x".join(map(str, layer.weight.shape)), str(rank), f"{err[0]:.4f}", f"{err[1]:.4f}",
                          f"{ss[0]:.4g}", f"{ss[1]:.4g}", f"{ss[0] / ss[1]:.2f}x", f"{peak[0]:.3g}", f"{peak[1]:.3g}",
                          f"{seconds:.1f}s")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
