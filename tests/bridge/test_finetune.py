"""The fine-tuning bridge: ONNX → PyTorch → train → ONNX on the real digit CNN with real MNIST
images. The exported file keeps the interface and matches the module; distillation without
labels repairs an over-compressed model; two torchrun processes do as well as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import MODELS, mnist_test_images, run
from rich.console import Console
from typer.testing import CliRunner

from onnx_lowrank.bridge.finetune import FinetuneOptions, finetune
from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.cli import app
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.pipeline import compress, finetune_file

DIGIT = MODELS / "digit_cnn.onnx"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1200 MNIST test images (from 2000 on: apart from the conftest's 400) as an unlabeled .npz."""
    x, _ = mnist_test_images(1200, start=2000)
    path = tmp_path_factory.mktemp("train") / "train.npz"
    np.savez(path, image=x)
    return path


@pytest.fixture(scope="module")
def student(data, tmp_path_factory):
    """The digit CNN compressed far past a useful eps (0.3, at confidence 0.5: the measured drop, not a
    bound, within it; about 6x fewer MACs, 80% agreement), so there is something to repair (not
    compensated, which would repair part of it)."""
    config = CompressConfig(eps=0.3, confidence=0.5, compensate=False, rank_multiple=1)  # the damage: any ranks
    model, report = compress(DIGIT, config, calibration=data)
    assert report.mac_ratio > 5
    path = tmp_path_factory.mktemp("student") / "student.onnx"
    onnx.save(model, path)
    return path


def test_export_keeps_the_interface_and_matches_the_module(student):
    """Round trip: names, the dynamic batch axis and the opset kept; batch sizes 1 and 7 run; the
    exported file gives the module's outputs (the export checks that itself, within 1e-4, and
    with no epochs the module is the student, so the file must give the student's outputs)."""
    model = onnx.load(str(student))
    x, _ = mnist_test_images(7)
    data = CalibrationSet({"image": x})
    exported, log = finetune(model, onnx.load(str(DIGIT)), data, FinetuneOptions(epochs=0))
    assert log.parity <= 1e-4
    assert [i.name for i in exported.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in model.graph.output]
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert exported.opset_import[0].version == model.opset_import[0].version
    for batch in (1, 7):
        (got,), (want,) = run(exported, {"image": x[:batch]}), run(model, {"image": x[:batch]})
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_distillation_without_labels_repairs_a_compressed_model(student, data, tmp_path):
    out = tmp_path / "tuned.onnx"
    before = student.read_bytes()
    result = finetune_file(student, out, DIGIT, data, options=FinetuneOptions(epochs=2))
    assert student.read_bytes() == before
    assert result.metric == "agreement"
    assert result.losses[-1] < result.losses[0]
    assert result.quality_after > result.quality_before + 0.05, result
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_two_torchrun_processes_match_one(student, data, tmp_path):
    """DistributedDataParallel over 2 gloo processes, each with half the data per epoch (so half
    the steps at the same batch size): within 0.03 agreement of one process (about 10 of the 360
    held-out samples)."""
    args = ["finetune", str(student), "OUT", "--teacher", str(DIGIT), "--calib", str(data), "--epochs", "2"]
    single = CliRunner().invoke(app, [a if a != "OUT" else str(tmp_path / "one.onnx") for a in args])
    assert single.exit_code == 0, single.output
    double = torchrun([a if a != "OUT" else str(tmp_path / "two.onnx") for a in args])
    assert double.returncode == 0, double.stderr[-2000:]
    assert "2 process(es)" in double.stdout

    def after(output: str) -> float:
        return float(output.split("->")[1].split()[0])

    assert abs(after(double.stdout) - after(single.output)) <= 0.03, (single.output, double.stdout)
    assert (tmp_path / "two.onnx").exists()  # written once, by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "two.onnx"]


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`onnx-lowrank ARGS` under torchrun on this machine's CPU (gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                           str(processes), str(Path(sys.executable).with_name("onnx-lowrank"))] + args,
                          capture_output=True, text=True, env=env, timeout=600)


def test_convert_with_finetune_epochs_under_torchrun(tmp_path):
    """The whole convert loop in 2 processes: each selects the same models, the fine-tunes run
    with DistributedDataParallel, and rank 0 alone writes the model and prints the result."""
    x, y = mnist_test_images(600, start=2000)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x, labels=y)
    out = tmp_path / "out.onnx"
    result = torchrun(["convert", str(DIGIT), str(out), "--eps", "0.02", "--calib", str(calib), "--labels", "labels",
                       "--finetune-epochs", "1", "--report", str(tmp_path / "report.json")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(f"wrote {out}") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "out.onnx", "report.json"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finetune"] and report["drop"] <= 0.02
    assert {r["processes"] for r in report["finetune"]} == {2}  # DistributedDataParallel over both
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_finetune_without_torch_is_one_line(student, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    result = CliRunner().invoke(app, ["finetune", str(student), str(tmp_path / "out.onnx"), "--teacher", str(DIGIT),
                                      "--calib", str(data)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'onnx-lowrank[torch]'" in lines[0]
    assert not list(tmp_path.iterdir())


def test_a_rate_too_large_for_the_model_leaves_the_conversion_whole(calib, monkeypatch):
    """At lr 1e5 no rate down to a thousandth of it lowers the loss: each round stops with its
    weights untouched, the conversion still writes a model within eps and says so. A fine-tune that ends in NaN outputs anyway (the export's check) is a missed round."""
    import onnx_lowrank.bridge.finetune as bridge_finetune
    from onnx_lowrank.errors import FinetuneDiverged

    plain = compress(DIGIT, CompressConfig(eps=0.02), calibration=calib, labels="labels")[1]
    with pytest.warns(UserWarning, match="fine-tuning stopped early"):
        _, report = compress(DIGIT, CompressConfig(eps=0.02, finetune_epochs=1, finetune_lr=1e5),
                             calibration=calib, labels="labels")
    assert report.finetune and all(r["stopped"] and r["losses"] == [] for r in report.finetune)
    assert all(r["drop_after"] == r["drop_before"] for r in report.finetune)  # the weights did not move
    # (a more compressed selection whose held-out drop fits without training is taken as it is)
    assert report.mac_ratio >= plain.mac_ratio - 1e-9 and report.drop <= 0.02

    def diverges(*args, **kwargs):
        raise FinetuneDiverged("fine-tuning diverged: the module outputs NaN or Inf; try a smaller --lr")

    monkeypatch.setattr(bridge_finetune, "finetune", diverges)
    _, report = compress(DIGIT, CompressConfig(eps=0.02, finetune_epochs=1), calibration=calib, labels="labels")
    assert report.finetune and all(r["drop_after"] is None for r in report.finetune)
    assert report.mac_ratio == pytest.approx(plain.mac_ratio)
    console = Console(record=True, width=200)
    console.print(report.tables()[1])  # the rounds table
    assert "diverged" in console.export_text()


def test_a_rate_that_raises_the_loss_backs_off(student, data):
    """At lr 10 the first epoch's loss rises above the student's own: that epoch runs again from
    the same weights at a tenth of the rate, until one keeps it below."""
    x = np.load(data)["image"][:600]
    _, log = finetune(onnx.load(str(student)), onnx.load(str(DIGIT)), CalibrationSet({"image": x}),
                      FinetuneOptions(epochs=2, lr=10.0))
    assert log.lr < 10.0 and len(log.losses) == 2
    assert log.losses[0] <= log.start_loss and log.losses[1] <= min(log.start_loss, 2 * log.losses[0])


def test_finetune_loop_at_eps_zero_ends(calib):
    """No drop to double: the loop does not try to compress further (it once spun forever)."""
    _, report = compress(DIGIT, CompressConfig(eps=0.0, finetune_epochs=1, verify=False), calibration=calib)
    assert all(r["search_eps"] == 0.0 for r in report.finetune)


def test_convert_finetune_without_torch_is_one_line_before_any_work(tmp_path, monkeypatch, calib):
    from onnx_lowrank.pipeline import stages as pipeline

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(pipeline, "load_calibration", lambda *a, **k: pytest.fail("calibration started"))
    result = CliRunner().invoke(app, ["convert", str(DIGIT), str(tmp_path / "out.onnx"), "--calib", str(calib),
                                      "--finetune-epochs", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'onnx-lowrank[torch]'" in lines[0]
    assert not list(tmp_path.iterdir())


def test_convert_with_finetune_epochs_compresses_further_within_eps(tmp_path):
    """Kokhazadeh et al.'s loop in `convert`: every round is recorded; the model written is within eps and has at least the MAC reduction of the same conversion without fine-tuning."""
    x, y = mnist_test_images(1200, start=2000)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x, labels=y)
    plain = compress(DIGIT, CompressConfig(eps=0.005), calibration=calib, labels="labels")[1]
    model, report = compress(DIGIT, CompressConfig(eps=0.005, finetune_epochs=1),
                             calibration=calib, labels="labels")
    rounds = report.finetune
    assert len(rounds) >= 2 and rounds[0]["round"] == "selected for eps 0.005"
    assert report.drop <= 0.005 and report.mac_ratio >= plain.mac_ratio
    # after a miss, Kokhazadeh et al.'s similarity analysis raises ranks: less compression, one round at a time,
    # until a round fits (and ends the loop) or nothing cheaper than the best is left
    for before, after in zip(rounds, rounds[1:]):
        if after["round"].startswith("raised"):
            assert before["bound_after"] > 0.005 or before["round"].startswith("raised")
            assert after["mac_ratio"] < before["mac_ratio"]
    if rounds[-1]["round"].startswith("raised") and rounds[-1]["bound_after"] <= 0.005:
        assert report.mac_ratio >= rounds[-1]["mac_ratio"] - 1e-9  # that model is written (merges only cut MACs)
        assert any("by the cosine analysis" in layer.reason for layer in report.layers)
    onnx.checker.check_model(model, full_check=True)
    # the held-out drop reported is the written model's, measured here again on the held-out part
    _, held = CalibrationSet({"image": x}, y).split(CompressConfig().holdout, 0)
    acc = [float(np.mean(run(m, held.inputs)[0].argmax(1) == held.labels)) for m in (onnx.load(str(DIGIT)), model)]
    assert acc[0] - acc[1] == pytest.approx(report.drop, abs=1e-9)
    assert report.check_samples == len(held) and report.bound <= 0.005


def test_a_teacher_with_other_inputs_is_one_line(student, data, tmp_path):
    from helpers import conv_model

    teacher = tmp_path / "teacher.onnx"
    onnx.save(conv_model(np.ones((4, 4, 3, 3), np.float32)), teacher)
    result = CliRunner().invoke(app, ["finetune", str(student), str(tmp_path / "out.onnx"), "--teacher", str(teacher),
                                      "--calib", str(data)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "the teacher's inputs" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_iterative_mode_factors_each_layer_from_the_weights_trained_so_far(data):
    """Yang & Liu's iterative mode: the layers replaced in the order given, one per step, each factored
    from its weight as the fine-tunes before it left it; the result exports like a one-shot fine-tune."""
    from onnx_lowrank.bridge.finetune import finetune_iteratively
    from onnx_lowrank.decompositions import decompose
    from onnx_lowrank.graph import find_targets, prepare

    model = prepare(onnx.load(str(DIGIT)))
    originals = {t.name: t.layer.weight for t in find_targets(model)[0]}
    order = list(originals)[::-1][:3]  # the last layers first: not the graph's order
    seen, steps = [], []

    def factor(name):
        def make(layer):
            seen.append((name, float(np.abs(layer.weight - originals[name]).max())))
            return decompose(layer, "svd", rank=4)
        return make

    x = np.load(data)["image"][:600]
    tuned, log = finetune_iteratively(model, onnx.load(str(DIGIT)), [(n, factor(n)) for n in order],
                                      CalibrationSet({"image": x}), FinetuneOptions(epochs=1),
                                      after_step=lambda name, m: steps.append((name, {t.name for t in find_targets(m)[0]})))
    assert [name for name, _ in seen] == order == [name for name, _ in steps]
    assert seen[0][1] == 0  # the first layer is factored from the original weight ...
    assert all(moved > 0 for _, moved in seen[1:])  # ... the later ones from fine-tuned weights
    for k, (_, targets) in enumerate(steps):  # after step k, the layers of steps <= k are chains
        assert not set(order[:k + 1]) & targets and set(order[k + 1:]) <= targets
    assert len(log.losses) == 3 and log.parity <= 1e-4
    assert 0 < log.lr <= FinetuneOptions().lr and not log.stopped  # the steps' rate, not an unset 0
    assert [i.name for i in tuned.graph.input] == [i.name for i in model.graph.input]


def test_convert_iterative_orders_layers_by_hessian_trace(tmp_path, monkeypatch):
    """`convert --finetune-epochs 1 --iterative`: the factored layers go in decreasing Hessian trace,
    and the written model stays within eps."""
    import onnx_lowrank.bridge as bridge
    import onnx_lowrank.bridge.finetune as bridge_finetune

    x, y = mnist_test_images(600, start=2000)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x, labels=y)
    orders, traces = [], {}
    real_iterative, real_traces = bridge_finetune.finetune_iteratively, bridge.hessian_traces

    def recording_iterative(model, teacher, layers, *args, **kwargs):
        orders.append([name for name, _ in layers])
        return real_iterative(model, teacher, layers, *args, **kwargs)

    def recording_traces(*args, **kwargs):
        traces.update(real_traces(*args, **kwargs))
        return traces

    monkeypatch.setattr(bridge_finetune, "finetune_iteratively", recording_iterative)
    monkeypatch.setattr(bridge, "hessian_traces", recording_traces)
    model, report = compress(DIGIT, CompressConfig(eps=0.01, finetune_epochs=1, iterative=True),
                             calibration=calib, labels="labels")
    assert orders and report.drop <= 0.01
    assert all(len(order) >= 2 for order in orders)
    for order in orders:
        assert [traces[n] for n in order] == sorted((traces[n] for n in order), reverse=True)
    onnx.checker.check_model(model, full_check=True)
