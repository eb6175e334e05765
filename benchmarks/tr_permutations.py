"""RSDTR's reduced-storage TR on real conv kernels: at each relative error eps, the fewest
parameters tau_0 reaches (over its divisors R1) against the ring RSDTR picks over all four circular
permutations and divisors, and that ring's parameter count by RSDTR's Table 1 formula.

    .venv/bin/python benchmarks/tr_permutations.py
"""

from __future__ import annotations

import numpy as np
from real_kernels import digit_cnn_convs
from rich.console import Console
from rich.table import Table

from onnx_lowrank.decompositions import decompose
from onnx_lowrank.decompositions.tr import table1_storage, tr_svd_runs

EPS = (0.1, 0.3, 0.5)


def main() -> None:
    table = Table(title="TR-SVD at eps on digit-recognizer CNN kernels: tau_0 vs RSDTR's search (RSDTR)")
    for col in ("layer", "kernel (TxCxDxD)", "eps", "dense params", "best tau_0", "chosen", "R1..R4", "params",
                "Table 1", "vs tau_0", "error"):
        table.add_column(col, justify="right")
    for name, layer in digit_cnn_convs():
        w = layer.weight.astype(np.float64)
        t, c, d1, d2 = w.shape
        for eps in EPS:
            tau0 = min(sum(core.size for core in run) for run in tr_svd_runs(w, eps))
            f = decompose(layer, "tr", eps=eps)
            formula = table1_storage(f.shift, f.tr_ranks, t, c, d1, d2)
            table.add_row(name, "x".join(map(str, w.shape)), f"{eps}", str(w.size), str(tau0), f"tau_{f.shift}",
                          ",".join(map(str, f.tr_ranks)), str(f.weight_params), str(formula),
                          f"{(f.weight_params - tau0) / tau0:+.1%}", f"{f.error():.3f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
