"""Compensation (compensation/refit.py): each factored layer's last step refit, in graph order, to the
original layer's outputs given the compressed model's own inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import MODELS, init, make_model, run, tensor
from onnx import helper

from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.compensation.refit import Compensation
from onnx_lowrank.decompositions import decompose
from onnx_lowrank.graph import find_targets, prepare, replace_layers
from onnx_lowrank.graph.downstream import with_outputs
from onnx_lowrank.graph.rewrite import Rewritten
from onnx_lowrank.runtime.sessions import predict


def _mnist(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "mnist_test.npz")
    return data["image"][start:start + n], data["labels"][start:start + n]


def _outputs(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    return predict(with_outputs(model, names), CalibrationSet({model.graph.input[0].name: x}), 256, names)


def _factored(prepared, targets, rank: int, method: str = "svd") -> Rewritten:
    return replace_layers(prepared, [(t, decompose(t.layer, method, rank=rank)) for t in targets], infer=False)


def test_refit_brings_every_layer_closer_to_the_original_on_unseen_digits():
    prepared = prepare(onnx.load(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(prepared)
    before = prepared.SerializeToString()
    fit_x, _ = _mnist(0, 512)
    x, labels = _mnist(5000, 2000)  # digits the refit never saw
    comp = Compensation.read(prepared, targets, CalibrationSet({"image": fit_x}), 64, 0, 2**30)
    assert set(comp.targets) == {t.name for t in targets}
    plain = _factored(prepared, targets, rank=4).model
    factored = _factored(prepared, targets, rank=4)
    refit = comp.refit(factored.model, factored.chains)
    assert prepared.SerializeToString() == before  # the model it was built from is left alone

    names = [t.output for t in targets]
    original = _outputs(prepared, x, names)
    errors = {}
    for label, model in (("plain", plain), ("refit", refit)):
        got = _outputs(model, x, names)
        errors[label] = [np.linalg.norm(g - o) / np.linalg.norm(o) for g, o in zip(got, original)]
    # plain (not data-aware) factors: even the first layer, fed the original's input, gains
    for k, (p, r) in enumerate(zip(errors["plain"], errors["refit"])):
        assert r < 0.9 * p, (k, errors)
    logits = {label: run(m, {"image": x})[0] for label, m in (("plain", plain), ("refit", refit))}
    accuracy = {label: float(np.mean(v.argmax(1) == labels)) for label, v in logits.items()}
    assert accuracy["refit"] > accuracy["plain"] + 0.01, accuracy


def test_an_exact_chain_stays_exact():
    prepared = prepare(onnx.load(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(prepared)
    x, _ = _mnist(0, 256)
    comp = Compensation.read(prepared, targets, CalibrationSet({"image": x}), 64, 0, 2**30)
    full = replace_layers(prepared, [(t, decompose(t.layer, "svd")) for t in targets], infer=False)
    refit = comp.refit(full.model, full.chains)
    want, got = run(prepared, {"image": x[:64]})[0], run(refit, {"image": x[:64]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def _dense_model(rng, bias: str) -> onnx.ModelProto:
    """x (N, T, 16) -> dense 16->24 -> Relu -> dense 24->12: MatMul + Add (Keras), bias-less
    MatMul, or Gemm on 2-D rows."""
    w1, w2 = rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal((24, 12)).astype(np.float32)
    b1, b2 = rng.standard_normal(24).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    if bias == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="d1"),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Gemm", ["r", "W2"], ["y"], name="d2")]
        inits = [init("W1", w1), init("B1", b1), init("W2", w2)]
        return make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 12])], inits)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="d1"),
             helper.make_node("Add", ["m1", "B1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y" if bias == "none" else "m2"], name="d2")]
    inits = [init("W1", w1), init("B1", b1), init("W2", w2)]
    if bias == "add":
        nodes.append(helper.make_node("Add", ["m2", "B2"], ["y"]))
        inits.append(init("B2", b2))
    return make_model(nodes, [tensor("x", ["N", 5, 16])], [tensor("y", ["N", 5, 12])], inits)


@pytest.mark.parametrize("bias", ["add", "none", "gemm"])
def test_dense_patterns_are_refit(bias):
    rng = np.random.default_rng(0)
    prepared = prepare(_dense_model(rng, bias))
    targets, _ = find_targets(prepared)
    assert len(targets) == 2
    shape = (400, 16) if bias == "gemm" else (400, 5, 16)
    x = rng.standard_normal(shape).astype(np.float32)
    comp = Compensation.read(prepared, targets, CalibrationSet({"x": x[:300]}), 64, 0, 2**30)
    plain = _factored(prepared, targets, rank=6).model
    factored = _factored(prepared, targets, rank=6)
    refit = comp.refit(factored.model, factored.chains)
    want = run(prepared, {"x": x[300:]})[0]
    err = {label: np.linalg.norm(run(m, {"x": x[300:]})[0] - want) for label, m in (("plain", plain), ("refit", refit))}
    assert err["refit"] < 0.9 * err["plain"], err


def test_a_folded_model_answers_each_sample_with_its_folds_model():
    prepared = prepare(onnx.load(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(prepared)
    x, _ = _mnist(0, 200)
    data = CalibrationSet({"image": x})
    comp = Compensation.read(prepared, targets, data, 64, 0, 2**30)
    assert 80 <= comp.fold.sum() <= 120 and len(comp.fold) == 200
    factored = _factored(prepared, targets, rank=4)
    folded = comp.crossfit(factored.model, factored.chains)
    # a part taken in another order (the drop meter runs fragile samples first) keeps the pairing
    part = data.take(np.random.default_rng(1).permutation(200)[:150])
    got = predict(folded, part, 32)[0]
    for k in (0, 1):
        mine = comp.fold[part.indices] == k
        want = run(folded.models[k], {"image": part.inputs["image"][mine]})[0]
        np.testing.assert_allclose(got[mine], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the two refits saw different samples: they differ
    assert not np.allclose(run(folded.models[0], {"image": x})[0], run(folded.models[1], {"image": x})[0])


def test_convert_checks_the_written_model_and_the_cross_fitted_refits(calib, tmp_path):
    """Compensated by default, --no-compensate writes the factors as decomposed: both decided on the
    held-out part, their bounds within eps."""
    from typer.testing import CliRunner

    from onnx_lowrank.cli import app

    reports = {}
    for flag in ([], ["--no-compensate"]):
        out, report = tmp_path / f"out{len(flag)}.onnx", tmp_path / f"r{len(flag)}.json"
        result = CliRunner().invoke(app, ["convert", str(MODELS / "digit_cnn.onnx"), str(out), "--calib", str(calib),
                                          "--labels", "labels", "--eps", "0.01", "--report", str(report), *flag],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        reports[bool(flag)] = json.loads(report.read_text())
    compensated, plain = reports[False], reports[True]
    assert compensated["bound"] <= 0.01 and plain["bound"] <= 0.01


def test_the_references_read_in_the_statistics_pass_are_those_read_alone():
    """The pipeline reads what compensation fits to in the one calibration pass that also takes
    the layer statistics: the same rows as a pass of its own."""
    from onnx_lowrank.calibration.capture import capture_within
    from onnx_lowrank.compensation.refit import References

    prepared = prepare(onnx.load(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(prepared)
    x, _ = _mnist(0, 300)
    data = CalibrationSet({"image": x})
    references = References(targets, data, 0, 2**30)
    stats, _, batch = capture_within(prepared, targets, data, 64, 8 * 2**30, 0, references)
    together, alone = Compensation(references), Compensation.read(prepared, targets, data, batch, 0, 2**30)
    assert set(stats) == {t.name for t in targets}
    for k in (0, 1):
        np.testing.assert_array_equal(together.parts[k].indices, alone.parts[k].indices)
        for name in together.targets:
            np.testing.assert_array_equal(together.reference[k][name].rows, alone.reference[k][name].rows)
