"""The bound `--eps` is held to: calibrated on data with a known change rate, groups kept whole
by every split, and the line for a held-out part too small to bound eps."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.calibration.data import CalibrationError, CalibrationSet
from onnx_lowrank.metrics.confidence import count_bound, level_in_force, no_change_bound, samples_for
from onnx_lowrank.metrics.quality import drop_bound, resolution


def _logits(correct: np.ndarray, labels: np.ndarray, classes: int = 10) -> np.ndarray:
    """Logits whose top-1 is the label where `correct`, another class elsewhere."""
    out = np.zeros((len(labels), classes), np.float32)
    wrong = (labels + 1) % classes
    out[np.arange(len(labels)), np.where(correct, labels, wrong)] = 1.0
    return out


@pytest.mark.parametrize("p_lost,p_gained,n", [(0.004, 0.001, 500), (0.01, 0.002, 1000), (0.002, 0.002, 300)])
def test_the_count_bound_covers_a_known_change_rate(p_lost, p_gained, n):
    """A model that loses each sample the original gets right with one probability and gains each
    it gets wrong with another: over many draws of the samples, the bound at 0.9 is at least the
    true drop (p_lost - p_gained) in at least 90% of them."""
    rng = np.random.default_rng(0)
    covered = 0
    draws = 1000
    for _ in range(draws):
        labels = rng.integers(0, 10, n)
        change = rng.random(n)
        original_right = rng.random(n) < 0.99
        # lost: right before, wrong after; gained: wrong before, right after (rates over all samples)
        lost = original_right & (change < p_lost / 0.99)
        gained = ~original_right & (change < p_gained / 0.01)
        after = original_right ^ lost ^ gained
        bound = drop_bound("accuracy", [_logits(original_right, labels)], [_logits(after, labels)], labels, None,
                           None, 0.9)
        assert bound.drop == pytest.approx((lost.sum() - gained.sum()) / n)
        covered += bound.upper >= p_lost - p_gained
    assert covered / draws >= 0.9


def test_the_bootstrap_bound_covers_a_known_r2_drop():
    """r2: heavy-tailed per-sample errors of a known mean; the studentized bootstrap bound at 0.9
    covers it in 0.89 of 300 draws (the percentiles of the bootstrap: 0.86); asserted with the Monte
    Carlo error of 300 draws below 0.9 (0.05: 3 standard errors)."""
    rng = np.random.default_rng(1)
    covered, draws, n = 0, 300, 400
    for _ in range(draws):
        ref = rng.standard_normal((n, 3))
        noise = rng.standard_normal((n, 3)) * np.sqrt(rng.exponential(0.01, (n, 1)))  # heavy-tailed per sample
        bound = drop_bound("r2", [ref], [ref + noise], None, None, None, 0.9, seed=int(rng.integers(1 << 30)))
        covered += bound.upper >= 0.01 * 1.0  # E[noise^2] = 0.01 per channel, each channel's variance ~1
    assert covered / draws >= 0.85


def test_no_change_bounds_and_the_samples_that_bound_eps():
    assert no_change_bound(500, 0.9) == pytest.approx(1.6424 / (500 + 1.6424), rel=1e-3)  # z^2 / (n + z^2)
    need = samples_for(0.005, 0.9)
    assert no_change_bound(need, 0.9) <= 0.005 < no_change_bound(need - 1, 0.9)
    assert level_in_force(0.005, need, 0.9) == 0.9
    lower = level_in_force(0.005, 150, 0.9)
    assert 0.75 <= lower < 0.9 and no_change_bound(150, lower) <= 0.005
    assert level_in_force(0.005, 50, 0.9) is None  # it would be 0.69: nothing is promised
    assert count_bound(3, 1, 1000, 0.9) > count_bound(2, 0, 1000, 0.9) > (3 - 1) / 1000  # variance of 4 changes


def test_a_held_out_part_too_small_says_so_and_lowers_the_level():
    line, level, warning = resolution("accuracy", 150, None, 0.005, 0.9, 0.5)
    assert line.startswith("150 held-out samples: one changed sample is 0.0067")
    need = samples_for(0.005, 0.9)
    assert f"{need} held-out samples would (about {2 * need} calibration samples at --holdout 0.5)" in warning
    assert level < 0.9 and f"bounded at confidence {level:g}" in warning
    assert resolution("accuracy", 1000, None, 0.005, 0.9, 0.5)[1:] == (0.9, None)
    assert resolution("r2", 30, None, 0.005, 0.9, 0.5) == ("30 held-out samples", 0.9, None)
    # 1000 samples from 50 photos are worth 50 independent ones to a count: eps only at 0.69
    line, level, warning = resolution("accuracy", 1000, np.arange(1000) // 20, 0.005, 0.9, 0.5)
    assert "from 50 groups, worth 50 independent ones" in line and level == 0.9
    assert "cannot be bounded" in warning and "nothing is factored" in warning
    # a bootstrap over 4 photos bounds nothing
    line, level, warning = resolution("r2", 200, np.arange(200) // 50, 0.01, 0.9, 0.5)
    assert "holds 4 groups" in warning and "nothing is factored" in warning


def test_groups_never_straddle_a_split():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(37), rng.integers(1, 12, 37))
    data = CalibrationSet({"x": np.arange(len(groups), dtype=np.float32)[:, None]}, groups=groups)
    for seed in range(5):
        first, second = data.split(0.5, seed)
        assert not set(first.groups) & set(second.groups)
        assert len(first) + len(second) == len(data)
        assert abs(len(second) - len(data) / 2) <= np.bincount(groups).max()  # whole groups to the share
        # the compensation folds are split the same way, within a part
        a, b = first.split_positions(0.5, seed)
        assert not set(first.groups[a]) & set(first.groups[b])
    with pytest.raises(CalibrationError, match="at least 2"):
        CalibrationSet({"x": np.zeros((5, 1), np.float32)}, groups=np.zeros(5, np.int64)).split(0.5, 0)


def test_the_bootstrap_draws_whole_groups():
    """Every resample holds each drawn group whole: as many of its members as the group has, times
    the draws of it."""
    groups = np.repeat(np.arange(20), 5)
    ref = np.random.default_rng(3).standard_normal((100, 2))
    seen = []

    def metric(reference, outputs, indices):
        seen.append(np.asarray(indices))
        return float(np.mean(np.square(outputs[0] - reference[0])))

    from onnx_lowrank.metrics.user import UserMetric
    bound = drop_bound(UserMetric(metric), [ref], [ref + 0.1], None, np.arange(100), groups, 0.9)
    assert np.isfinite(bound.upper) and bound.upper >= bound.drop
    assert bound.groups == 20 and bound.method == "bootstrap"
    for indices in seen:
        counts = np.bincount(groups[indices], minlength=20)
        assert np.all(counts % 5 == 0)


def test_grouped_counts_are_bounded_at_their_effective_size():
    """Changes that come in whole groups (one photo's crops all flip together) bound wider than the
    same changes spread over independent samples."""
    n = 1000
    labels = np.zeros(n, np.int64)
    right = np.ones(n, bool)
    lost = np.zeros(n, bool)
    lost[:10] = True  # ten crops of one photo
    groups = np.arange(n) // 10
    ref, out = [_logits(right, labels)], [_logits(right & ~lost, labels)]
    alone = drop_bound("accuracy", ref, out, labels, None, None, 0.9)
    grouped = drop_bound("accuracy", ref, out, labels, None, groups, 0.9)
    assert grouped.drop == alone.drop == 0.01 and grouped.upper > alone.upper and grouped.groups == 100


def test_a_bootstrap_over_too_few_groups_bounds_nothing():
    ref = np.random.default_rng(4).standard_normal((60, 2))
    bound = drop_bound("r2", [ref], [ref * 1.001], None, None, np.arange(60) // 10, 0.9)
    assert bound.groups == 6 and bound.upper == float("inf") and bound.drop < 1e-5
