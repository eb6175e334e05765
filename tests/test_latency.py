"""Latency: layer micro-models, the on-disk cache, `--cost latency` and `--rank-multiple` in a real
conversion, interleaved timing, and the `bench` command. Nothing here asserts a speed: only what
was measured is consistent (chosen chains measured faster than their layers, cached values
reused)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from helpers import MODELS
from typer.testing import CliRunner

from onnx_lowrank.cli import app
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.decompositions import decompose
from onnx_lowrank.graph import find_targets, load_model, prepare
from onnx_lowrank.pipeline import compress
from onnx_lowrank.runtime import latency
from onnx_lowrank.runtime.latency import LayerTimer, interleaved, micro_model
from onnx_lowrank.runtime.sessions import session

DIGIT = MODELS / "digit_cnn.onnx"


@pytest.fixture(scope="module")
def digit():
    model = prepare(load_model(DIGIT))
    targets, _ = find_targets(model)
    return model, targets


def test_micro_model_computes_the_layer(digit):
    model, targets = digit
    conv = targets[1]
    micro = micro_model(model, conv, (2, 32, 13, 13))
    onnx.checker.check_model(micro, full_check=True)
    found, _ = find_targets(micro)
    assert [t.name for t in found] == [conv.name]


def test_timer_caches_on_disk_by_structure_not_weights(digit, tmp_path):
    model, targets = digit
    conv = targets[1]
    shape = (1, 32, 13, 13)
    cache = tmp_path / "latency.json"
    timer = LayerTimer(model, cache=cache)
    a = timer.seconds(conv, shape, None)
    f = decompose(conv.layer, "svd", rank=8)
    b = timer.seconds(conv, shape, f)
    assert a > 0 and b > 0 and timer.timed == 2
    # same ranks, other weight values: the same structure, found in the cache
    other = decompose(replace(conv.layer, weight=-conv.layer.weight), "svd", rank=8)
    assert timer.seconds(conv, shape, other) == b and timer.timed == 2
    timer.save()
    again = LayerTimer(model, cache=cache)
    assert again.seconds(conv, shape, f) == b and again.timed == 0
    # another rank is another chain
    again.seconds(conv, shape, decompose(conv.layer, "svd", rank=9))
    assert again.timed == 1


def test_cost_latency_never_keeps_a_slower_chain(calib, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path))
    config = CompressConfig(eps=0.02, cost="latency", rank_multiple=8)  # 320 held-out samples decide
    model, report = compress(DIGIT, config, calibration=calib, labels="labels")
    onnx.checker.check_model(model, full_check=True)
    assert report.bound <= config.eps
    assert report.latency_before > 0 and report.latency_after > 0
    factored = [r for r in report.layers if r.method is not None]
    assert factored, "nothing factored on the digit CNN"
    for r in report.layers:
        assert r.latency_before is not None
        if r.method is not None:
            assert r.latency_after < r.latency_before
            assert all(k % 8 == 0 or k < 8 for k in r.ranks)  # below 8 only where the full rank is
    assert (tmp_path / "latency.json").exists()


def test_rank_multiple_rounds_every_rank(calib):
    config = CompressConfig(eps=0.01, select="rank", ratio=0.4, rank_multiple=16)
    _, report = compress(DIGIT, config, calibration=calib, labels="labels")
    ranks = [k for r in report.layers for k in r.ranks]
    assert max(ranks) >= 16
    assert all(k % 16 == 0 or k < 16 for k in ranks), ranks  # below 16 only where the full rank is


def test_interleaved_pauses_between_blocks_only_for_threaded_sessions(digit, monkeypatch):
    """A session of more than one thread leaves workers spinning after its block; the next block
    waits them out. One-thread sessions have none, and are not slowed."""
    model, _ = digit
    feed = {model.graph.input[0].name: np.zeros((1, 1, 28, 28), np.float32)}
    pauses = []
    monkeypatch.setattr(latency.time, "sleep", pauses.append)
    for threads, expected in ((1, 0.0), (2, latency.PAUSE), (0, latency.PAUSE)):  # 0: onnxruntime's default
        pauses.clear()
        sessions = [session(model, "deploy", threads) for _ in range(2)]
        times = interleaved(sessions, feed, min_runs=10, min_seconds=0.0)
        assert all(len(t) >= 10 for t in times)
        assert pauses and set(pauses) == {expected} and len(pauses) == 2 * len(times[0]) // 5


runner = CliRunner()


def test_bench_prints_the_models_side_by_side_and_json(calib, tmp_path):
    out = tmp_path / "small.onnx"
    result = runner.invoke(app, ["convert", str(DIGIT), str(out), "--eps", "0.01", "--calib", str(calib),
                                 "--labels", "labels"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["bench", str(DIGIT), str(out), "--batch", "1,4", "--seconds", "0.1", "--calib",
                                 str(calib), "--labels", "labels", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [lat["batch"] for lat in data["latency"]] == [1, 4]
    assert data["macs"][0] > data["macs"][1] and data["metric"] == "accuracy"
    assert data["drop"] == [pytest.approx(data["quality"][0] - data["quality"][1])]
    result = runner.invoke(app, ["bench", str(DIGIT), str(out), "--batch", "1", "--seconds", "0.1"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "speedup" in result.output
    # more than one compressed model (a float and an int8 result): each against the original
    result = runner.invoke(app, ["bench", str(DIGIT), str(out), str(DIGIT), "--batch", "1", "--seconds", "0.1",
                                 "--calib", str(calib), "--labels", "labels", "--json"])
    data = json.loads(result.output)
    assert len(data["models"]) == 3 and len(data["latency"][0]["speedup"]) == 2
    assert data["drop"][1] == 0 and data["macs"][2] == data["macs"][0]


@pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "x"], ["--provider", "NoSuchProvider"]])
def test_bench_bad_options_are_one_line(tmp_path, args):
    result = runner.invoke(app, ["bench", str(DIGIT), str(DIGIT)] + args)
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert len(result.output.strip().splitlines()) == 1
