"""The rank widths the kernels run fast: the block found in a width's timings, measured once and
cached, and what ranks default to."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.config import CompressConfig
from onnx_lowrank.runtime import widths


def _steps(block: int, noise: float, seed: int = 0) -> dict[int, float]:
    """Times of widths 1..64 that rise per started block of `block` (1: per width), with noise."""
    rng = np.random.default_rng(seed)
    return {w: (0.1 + 0.1 * np.ceil(w / block)) * (1 + noise * rng.standard_normal()) for w in range(1, 65)}


@pytest.mark.parametrize("block", [1, 4, 8, 16, 32])
def test_the_block_of_step_times_is_found_through_noise(block):
    # 10% noise: more than the probe's timings showed within a block on this machine (at 2 jobs' load)
    assert widths.block_of(_steps(block, 0.1 if block >= 8 else 0.0)) == block


def test_times_linear_in_the_width_have_no_block():
    rng = np.random.default_rng(1)
    assert widths.block_of({w: 0.1 + 0.01 * w * (1 + 0.02 * rng.standard_normal()) for w in range(1, 65)}) in (1, 2)


def test_the_block_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def times(provider, threads):
        calls.append((provider, threads))
        return _steps(16, 0.0)

    monkeypatch.setattr(widths, "chain_times", times)
    cache = tmp_path / "latency.json"
    assert widths.fast_block(cache=cache) == 16 and widths.fast_block(cache=cache) == 16
    assert widths.fast_block(threads=1, cache=cache) == 16
    assert calls == [("CPUExecutionProvider", 0), ("CPUExecutionProvider", 1)]  # a setting of its own


def test_the_probe_chain_runs_and_its_width_is_the_middle():
    from helpers import run

    model = widths.probe_chain(5)
    x = np.zeros((1, widths.CHANNELS, widths.SIZE, widths.SIZE), np.float32)
    assert run(model, {"x": x})[0].shape == (1, widths.CHANNELS, widths.SIZE, widths.SIZE)
    assert model.graph.initializer[0].dims[0] == 5


def test_ranks_default_to_the_measured_block_where_the_cost_is_speed(monkeypatch):
    monkeypatch.setattr(widths, "fast_block", lambda provider, threads: 16)
    assert CompressConfig().multiple()[0] == 16
    assert CompressConfig(cost="latency").multiple()[0] == 16
    assert CompressConfig(cost="params").multiple()[0] == 1  # size: every rank may pay
    assert CompressConfig(rank_multiple=3).multiple() == (3, "--rank-multiple")
