"""Sensitivities measured on the part of the model downstream of each layer equal those measured
by running the whole model with the layer replaced, on the default model's residual blocks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODELS, mnist_test_images

from onnx_lowrank.calibration.capture import capture
from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.graph import find_targets, io, load_model, prepare, replace_layers
from onnx_lowrank.graph.downstream import downstream
from onnx_lowrank.runtime.sessions import predict
from onnx_lowrank.selection.candidates import AUTO_METHODS, build_problems
from onnx_lowrank.selection.sensitivity import PROBE_ERROR, SUBSET, output_distortion, sensitivities


@pytest.fixture(scope="module")
def setup():
    model = prepare(load_model(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(model)
    x, _ = mnist_test_images(64)
    data = CalibrationSet({model.graph.input[0].name: x})
    stats, _ = capture(model, targets, data)
    return model, build_problems(targets, stats, AUTO_METHODS, "macs", True), data


def test_downstream_part_reads_the_skip_connections(setup):
    model, problems, _ = setup
    first = downstream(model.graph, problems[0].target.node)
    assert len(first.nodes) > len(model.graph.node) // 2  # the first conv reaches nearly everything
    mid = problems[len(problems) // 2]
    part = downstream(model.graph, mid.target.node)
    assert mid.target.node.input[0] in part.frontier
    # a conv inside a residual block: the block's input, added after it, is read at the frontier too
    assert any(len(downstream(model.graph, p.target.node).frontier) > 1 for p in problems)
    assert part.outputs == [o.name for o in model.graph.output]


@pytest.mark.parametrize("apart", [None, 1024])
def test_sensitivities_equal_whole_model_runs(setup, monkeypatch, apart):
    """Also with every weight of 1 KB or more set apart as a stub (graph.io.weights_apart): as
    VGG-16's are, each probe's session gets them as arrays."""
    model, problems, data = setup
    if apart is not None:
        monkeypatch.setattr(io, "APART", apart)
    fast = sensitivities(problems, model, data)
    subset = data.take(np.arange(SUBSET))
    reference = predict(model, subset)
    for p in problems:
        probes = [c for c in p.candidates if c.factored and c.error > 0]
        c = min(probes, key=lambda c: abs(np.log(c.error / PROBE_ERROR)))
        changed = predict(replace_layers(model, [(p.target, c.factors)], infer=False).model, subset)
        slow = max(output_distortion(reference, changed), 1e-12) / c.error ** 2
        assert fast[p.name] == pytest.approx(slow, rel=1e-3)
