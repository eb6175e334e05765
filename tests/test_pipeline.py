"""compress() end to end on the real digit CNN with real MNIST images: every strategy returns a
valid model within the budget it reports; the report is complete; the input is untouched."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import MODELS, mnist_test_images, run

from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress, compress_file

DIGIT = MODELS / "digit_cnn.onnx"


@pytest.mark.parametrize("select,extra", [
    ("auto", {}), ("rank", {"ratio": 0.3}), ("rank", {}), ("energy", {}), ("energy", {"energy": 0.95}),
    ("vbmf", {}), ("cosine", {}),
])
def test_every_strategy_gives_a_valid_model(calib, select, extra):
    config = CompressConfig(eps=0.01, select=select, **extra)
    model, report = compress(DIGIT, config, calibration=calib, labels="labels")
    onnx.checker.check_model(model, full_check=True)
    x, _ = mnist_test_images(8, start=5000)
    (logits,) = run(model, {"image": x})
    assert logits.shape == (8, 10) and np.all(np.isfinite(logits))
    assert report.metric == "accuracy"
    assert len(report.layers) + len(report.skipped) == 5
    if select != "vbmf" and not extra:  # strategies tuned to eps end within it on held-out data
        assert report.drop <= config.eps
    assert report.macs_after <= report.macs_before


def test_auto_compresses_within_eps_and_reports(calib, tmp_path):
    out = tmp_path / "out.onnx"
    report_path = tmp_path / "report.json"
    before = DIGIT.read_bytes()
    # 320 held-out samples bound eps 0.02 with a few changed (eps 0.01 with one)
    report = compress_file(DIGIT, out, CompressConfig(eps=0.02), calib, "labels", report_path)
    assert DIGIT.read_bytes() == before
    assert report.bound <= 0.02 and report.mac_ratio > 2.0
    data = json.loads(report_path.read_text())
    for key in ("eps", "metric", "layers", "skipped", "params_before", "params_after", "macs_before", "macs_after",
                "file_size_before", "file_size_after", "quality_before", "quality_after", "drop", "timings",
                "calibration", "trace", "mac_ratio", "check_samples", "bound", "confidence", "resolution"):
        assert key in data
    layer = data["layers"][0]
    assert set(layer) == {"name", "op_type", "method", "ranks", "params_before", "params_after", "macs_before",
                          "macs_after", "error", "reason", "latency_before", "latency_after", "precision"}
    assert layer["latency_before"] is None and data["latency_before"] is None  # timed only with --cost latency
    assert data["calibration"]["heldout"] == 320 and not data["calibration"]["synthetic"]  # --holdout 0.8 of 400
    assert data["check_samples"] == 320  # the held-out part decides
    assert data["confidence"] == 0.9 and data["bound_method"] == "score"
    # the whole-model counts agree with the per-layer ones
    saved = sum(r["macs_before"] - r["macs_after"] for r in data["layers"])
    assert data["macs_before"] - data["macs_after"] == saved


def test_data_aware_svd_beats_plain_at_equal_ranks(calib):
    """The same ranks with and without whitening: data-aware SVD is the best approximation of the
    layer's outputs on the captured inputs (Eckart-Young in the whitened space), so each layer's
    error there is no larger than plain SVD's. (Tucker-2, CP, TT and TR whiten the channel mode
    only, an approximation with no such guarantee; benchmarks/selection.py compares models.)"""
    config = dict(eps=0.01, select="rank", rank=8, methods=("svd",))
    _, aware = compress(DIGIT, CompressConfig(**config), calibration=calib, labels="labels")
    _, plain = compress(DIGIT, CompressConfig(**config, data_aware=False), calibration=calib, labels="labels")
    pairs = [(a.error, p.error) for a, p in zip(aware.layers, plain.layers) if a.method and p.method]
    assert pairs and all(a <= p + 1e-9 for a, p in pairs)
    assert sum(a for a, _ in pairs) < sum(p for _, p in pairs)


def test_without_calibration_data_it_warns_and_says_so():
    with pytest.warns(UserWarning, match="no calibration data"):
        _, report = compress(DIGIT, CompressConfig(eps=0.05, select="rank", ratio=0.5))
    assert report.calibration["synthetic"] and report.warnings


def test_exclude_by_name_and_op_type(calib):
    config = CompressConfig(eps=0.01, select="rank", ratio=0.5, exclude=("Gemm", "/conv_layers/conv_layers.3/Conv"))
    _, report = compress(DIGIT, config, calibration=calib, labels="labels")
    excluded = {s["name"] for s in report.skipped if s["reason"] == "excluded by --exclude"}
    assert excluded == {"/fc_layers/fc_layers.0/Gemm", "/fc_layers/fc_layers.2/Gemm", "/conv_layers/conv_layers.3/Conv"}


def test_hessian_strategy_through_the_torch_bridge(calib):
    _, report = compress(DIGIT, CompressConfig(eps=0.01, select="hessian"), calibration=calib, labels="labels")
    assert report.drop <= 0.01
    assert all("Hessian trace" in r.reason for r in report.layers if r.method)


def test_fp16_and_optimized_export_are_verified_like_the_rest(calib, tmp_path):
    plain = compress_file(DIGIT, tmp_path / "plain.onnx", CompressConfig(eps=0.01), calib, "labels")
    config = CompressConfig(eps=0.01, fp16=True, optimize=True)
    report = compress_file(DIGIT, tmp_path / "small.onnx", config, calib, "labels")
    model = onnx.load(str(tmp_path / "small.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert report.drop <= config.eps  # measured on the file as written: float16 weights included
    assert report.file_size_after < 0.6 * plain.file_size_after
    x, _ = mnist_test_images(7, start=6000)
    (logits,) = run(model, {"image": x})
    assert logits.shape == (7, 10) and np.all(np.isfinite(logits))


def test_back_off_writes_the_last_model_of_the_sequence_that_holds(calib):
    """From the cheapest candidate everywhere, the held-out part measures models of the step-back
    path safest first and stops at the first whose bound exceeds eps: the model written is the one
    before it, its bound within eps on the held-out part."""
    from onnx_lowrank.calibration.capture import capture
    from onnx_lowrank.calibration.data import load_calibration
    from onnx_lowrank.graph import find_targets, load_model, prepare
    from onnx_lowrank.metrics.quality import drop_bound
    from onnx_lowrank.runtime.sessions import predict
    from onnx_lowrank.selection.candidates import AUTO_METHODS, build_problems
    from onnx_lowrank.pipeline.verify import _sequence, assemble, nonfinite_samples, step_back, verify_choice

    prepared = prepare(load_model(DIGIT))
    targets, _ = find_targets(prepared)
    search, held = load_calibration(str(calib), prepared, "labels").split(0.8, 0)
    stats, _ = capture(prepared, targets, search)
    problems = build_problems(targets, stats, AUTO_METHODS, "macs", True)
    cheapest = {p.name: p.candidates[0] for p in problems}
    held_ref = predict(prepared, held)
    config = CompressConfig(eps=0.01)
    verified = verify_choice(prepared, problems, cheapest, "accuracy", held, held_ref, config, True, level=0.9)
    assert verified.steps > 0 and verified.bound.upper <= config.eps
    assert nonfinite_samples(held_ref, verified.outputs, len(held)) == 0

    def bound(choice):
        outputs = predict(assemble(prepared, problems, choice).model, held)
        return drop_bound("accuracy", held_ref, outputs, held.labels, None, None, 0.9).upper

    walk = [cheapest]
    while any(c.factored for c in walk[-1].values()):
        walk.append(step_back(problems, walk[-1]))
    assert all(walk[verified.steps][p.name] is verified.choice[p.name] for p in problems)
    order = _sequence([sum(c[p.name].cost for p in problems) for c in walk])
    assert verified.steps in order or verified.steps == len(walk) - 1
    tested = order[:verified.tested]
    assert all(bound(walk[k]) <= config.eps for k in tested[:-1])  # each held, in turn ...
    if tested[-1] != verified.steps:  # ... until one did not
        assert bound(walk[tested[-1]]) > config.eps


def test_gemm_with_transposed_activation_gets_its_rank(tmp_path):
    """Gemm with transA=1 reads its input vectors as the columns of A: captured that way, a
    rank-8 weight is found to be rank 8 and factored without error."""
    from onnx import helper

    from helpers import init, make_model, tensor

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((16, 8)) @ rng.standard_normal((8, 32))).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["xt", "W"], ["y"], name="fc", transA=1)]
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 32])], [init("W", weight)])
    x = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out, report = compress(model, CompressConfig(eps=0.01, select="cosine", rank_multiple=1),
                           calibration=tmp_path / "x.npz")
    (layer,) = report.layers
    assert layer.method == "svd" and layer.ranks == [8]
    np.testing.assert_allclose(run(out, {"x": x[:5]})[0], x[:5] @ weight, rtol=1e-3, atol=1e-3)
    # timed as it runs: the micro-model feeds the transposed A with its samples along axis 1
    _, timed = compress(model, CompressConfig(eps=0.01, cost="latency", rank_multiple=1),
                        calibration=tmp_path / "x.npz")
    assert timed.layers[0].latency_before > 0


def test_a_layer_lapack_cannot_decompose_is_kept_with_the_reason(calib):
    """A 1e25 weight (the outputs stay finite in float32) makes the next layer's input moments
    (sums of squares, 1e50) overflow: that layer is kept, saying why, and the rest converts."""
    from onnx import numpy_helper

    model = onnx.load(str(DIGIT))
    (fc0,) = [t for t in model.graph.initializer if t.name == "fc_layers.0.weight"]
    weight = numpy_helper.to_array(fc0).copy()
    weight.flat[0] = 1e25
    fc0.CopyFrom(numpy_helper.from_array(weight, fc0.name))
    # statistics from 320 of the 400 samples overflow (from the default 80 of them they do not)
    out, report = compress(model, CompressConfig(eps=0.02, holdout=0.2), calibration=calib, labels="labels")
    kept = [layer for layer in report.layers if "numerical failure" in layer.reason]
    assert kept and all(layer.method is None for layer in kept)
    onnx.checker.check_model(out, full_check=True)


def test_an_observer_sees_the_search_without_patching_it(calib):
    """compress(..., observer=): every model the search measured, with its drop, and auto's path
    with its pick; `written` builds a point of it as the file would be (the one written, when the
    held-out part keeps the pick)."""
    from onnx_lowrank.selection import SearchObserver

    class Watch(SearchObserver):
        def __init__(self):
            self.drops, self.paths = [], []

        def measured(self, search, choice, model, drop):
            self.drops.append(drop)

        def searched(self, search, path, knobs, pick):
            self.paths.append((search, path, knobs, pick))

    watch = Watch()
    model, report = compress(DIGIT, CompressConfig(eps=0.02), calibration=calib, labels="labels", observer=watch)
    assert sorted(watch.drops) == sorted(t.drop for t in report.trace if t.cost_ratio > 1.0)
    [(search, path, knobs, pick)] = watch.paths
    assert len(path) == len(knobs) and 0 <= pick < len(path)
    assert not any(c.factored for c in path[0].values())
    assert report.search_drop == search.drop(path[pick])  # the pick's drop, as measured (cached)
    assert report.backed_off == 0  # the held-out part kept the pick here: it is the model written
    x, _ = mnist_test_images(16, start=5000)
    assert np.allclose(run(search.written(path[pick]), {"image": x})[0], run(model, {"image": x})[0], atol=1e-5)
