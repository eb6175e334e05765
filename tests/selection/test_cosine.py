"""Kokhazadeh et al.'s similarity analysis on the default model's real layers: the 5% step up the ladder, and
which layers a model that missed eps gets raised."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODELS, mnist_test_images

from onnx_lowrank.calibration.capture import capture
from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.graph import find_targets, load_model, prepare
from onnx_lowrank.selection.candidates import AUTO_METHODS, build_problems
from onnx_lowrank.selection.strategies.cosine import STEP, Similarity, raise_dissimilar, step_up


@pytest.fixture(scope="module")
def setup():
    model = prepare(load_model(MODELS / "mnist_cnn.onnx"))
    targets, _ = find_targets(model)
    x, _ = mnist_test_images(64)
    stats, _ = capture(model, targets, CalibrationSet({model.graph.input[0].name: x}))
    problems = build_problems(targets, stats, AUTO_METHODS, "macs", True)
    return model, problems, Similarity(model, problems, {t.name: t.activation for t in targets})


def test_step_up_costs_at_most_five_percent_more_and_is_more_accurate(setup):
    _, problems, _ = setup
    stepped = 0
    for p in problems:
        for c in p.candidates:
            up = step_up(p, c)
            if not c.factored:
                assert up is c
                continue
            assert up.error < c.error or up is p.keep
            if up.factored:
                assert up.method == c.method
                within = [d for d in p.of(c.method) if c.error > d.error and d.cost <= c.cost + STEP * p.base_cost]
                if within:  # the best of the span, else the next more accurate rung
                    assert up.cost <= c.cost + STEP * p.base_cost + 1e-9
                    assert up.error == min(d.error for d in within)
                stepped += 1
    assert stepped > 50


def test_the_analysis_names_the_least_similar_layers(setup):
    _, problems, similar = setup
    cheapest = {p.name: min(p.candidates, key=lambda c: c.cost) for p in problems}
    sims = {p.name: similar(p, cheapest[p.name]) for p in problems}
    low = {n for n, s in sims.items() if s < similar.threshold[n]}
    assert low, sims  # rank 1 everywhere: some layer is far from its original
    raised, named = raise_dissimilar(similar, problems, cheapest)
    assert set(named) == low
    for p in problems:
        assert (raised[p.name] is cheapest[p.name]) == (p.name not in low)
        if p.name in low:
            assert similar(p, raised[p.name]) >= sims[p.name] - 1e-9
    # every layer above its threshold: the less similar half for --select cosine, the least
    # similar one in the fine-tuning loop
    mild = {p.name: next(c for c in sorted(p.candidates, key=lambda c: c.cost)  # the cheapest above it
                         if c.factored and similar(p, c) >= similar.threshold[p.name]) for p in problems}
    order = sorted(problems, key=lambda p: similar(p, mild[p.name]))
    assert similar.named(problems, mild) == order[: len(problems) // 2]
    _, named = raise_dissimilar(similar, problems, mild)
    assert named == [order[0].name]


def test_residual_layers_get_the_stricter_threshold(setup):
    _, problems, similar = setup
    thresholds = np.array([similar.threshold[p.name] for p in problems])
    assert set(thresholds) == {0.92, 0.96}  # mnist_cnn has plain and residual convs
