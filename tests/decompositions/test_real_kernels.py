"""Must-shows 4 and 5 on real trained kernels (the digit-recognizer CNN, models/digit_cnn.onnx).
The tables with every rank and eps: benchmarks/cp_epc.py and benchmarks/tr_permutations.py."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODELS

from onnx_lowrank.decompositions import cp, decompose
from onnx_lowrank.decompositions.tr import table1_storage, tr_svd_runs
from onnx_lowrank.graph import find_targets, load_model, prepare


@pytest.fixture(scope="module")
def convs():
    targets, _ = find_targets(prepare(load_model(MODELS / "digit_cnn.onnx")))
    return {t.name.split("/")[-2]: t for t in targets if t.op_type == "Conv"}


def test_epc_lowers_sensitivity_at_the_same_error(convs):
    layer = convs["conv_layers.6"].layer  # 128x64x3x3
    tensor = cp.to_cp_tensor(layer.weight.astype(np.float64), 3)
    als = cp.als(tensor, 16)
    corrected = cp.epc(tensor, als)
    error = [np.linalg.norm(tensor - cp.cp_to_tensor(f)) for f in (als, corrected)]
    assert error[1] == pytest.approx(error[0], rel=1e-6)
    assert cp.sensitivity(corrected) < 0.5 * cp.sensitivity(als)
    assert cp.intensities(corrected).max() < cp.intensities(als).max()


def table1_flops(shift, ranks, t, c, d1, d2, hw):
    """RSDTR Table 1's FLOPS column (stride 1, same padding: every spatial size is hw)."""
    r1, r2, r3, r4 = ranks
    return hw * {
        0: r2 * c * r3 + r3 * d1 * r4 * r2 + r4 * d2 * r1 * r2 + r1 * t * r2,
        1: r1 * c * r2 + r2 * d1 * r3 * r1 + r3 * d2 * r4 * r1 + r4 * t * r1,
        2: r4 * c * r1 + r1 * d1 * r2 * r4 + r2 * d2 * r3 * r4 + r3 * t * r4,
        3: r3 * c * r4 + r4 * d1 * r1 * r3 + r1 * d2 * r2 * r3 + r2 * t * r3,
    }[shift]


@pytest.mark.parametrize("name", ["conv_layers.3", "conv_layers.6"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_tr_search_beats_tau0_and_matches_table1(convs, name, eps):
    target = convs[name]
    w = target.layer.weight.astype(np.float64)
    t, c, d1, d2 = w.shape
    tau0 = min(sum(core.size for core in run) for run in tr_svd_runs(w, eps))
    f = decompose(target.layer, "tr", eps=eps)
    assert f.weight_params < tau0
    assert f.weight_params == table1_storage(f.shift, f.tr_ranks, t, c, d1, d2)
    assert f.error() <= eps
    hw = target.in_spatial[0] * target.in_spatial[1]  # 3x3 convs, stride 1, pad 1
    assert f.weight_macs(target.in_spatial) == table1_flops(f.shift, f.tr_ranks, t, c, d1, d2, hw)


def test_tr_never_stores_more_than_tau0(convs):
    for target in convs.values():
        w = target.layer.weight.astype(np.float64)
        for eps in (0.1, 0.5):
            tau0 = min(sum(core.size for core in run) for run in tr_svd_runs(w, eps))
            assert decompose(target.layer, "tr", eps=eps).weight_params <= tau0
