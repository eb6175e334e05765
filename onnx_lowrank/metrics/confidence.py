"""An upper confidence bound on a model's quality drop for new data from the calibration set's
distribution: what `--eps` is held to (`--confidence`, one-sided).

- Counts (accuracy, agreement): the drop is the share of samples lost less the share gained,
  paired over the same samples. Its bound is Tango's score bound for a difference of paired
  proportions (Tango 1998, Stat Med 17:891): well calibrated down to a handful of changed
  samples, where a normal approximation or a bootstrap of the count is not (a bootstrap of one
  lost sample never sees more than a few).
- r2 and cosine, a mean of what each sample adds (per output, the worst counting): a studentized
  bootstrap of that mean (bootstrap-t), which covers a heavy-tailed mean better than the
  percentiles do (errors of a few samples dominating: 0.89 against 0.87 at level 0.9 on 400
  samples of heavy-tailed squared errors). Your metric, a function of the whole set: a
  percentile bootstrap of it.
- With groups (`--groups`: photos, files, speakers), the bootstrap draws whole groups (at least
  MIN_GROUPS of them: fewer say nothing of the next group), and the counts are taken at the
  effective sample size of their grouping as if a group's samples all changed together (n over
  the size-weighted mean group size): the near-duplicates groups name do (copies of one line,
  crops of one photo), and how far they do cannot be measured from the few changes a count sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm

BOOTSTRAP = 1000       # resamples for a metric computed per sample (r2, cosine)
USER_BOOTSTRAP = 200   # ... for the user's metric, which may be costly to call
MIN_GROUPS = 10        # groups a bootstrap needs to bound anything
MIN_LEVEL = 0.75       # the lowest confidence a too small held-out part is decided at (level_in_force)


@dataclass(frozen=True)
class Bound:
    """A drop measured on `samples` samples and its one-sided upper bound at `level`."""

    drop: float
    upper: float
    level: float
    samples: int
    groups: int | None   # groups the samples came from (None: taken as independent)
    method: str          # "score" (counts) or "bootstrap"


def count_bound(lost: float, gained: float, n: float, level: float) -> float:
    """Upper bound at `level` on p_lost - p_gained from `lost` and `gained` of `n` paired samples:
    the largest difference d whose score statistic (lost - gained - n d) / sqrt(n (2 p_g(d) +
    d (1 - d))), p_g(d) the gain rate's maximum likelihood estimate given d, is at least -z."""
    if n <= 0:
        return 1.0
    z = float(norm.ppf(level))

    def score(d: float) -> float:
        a = 2 * n
        b = -lost - gained + (2 * n - lost + gained) * d
        c = -gained * d * (1 - d)
        p_gained = (np.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
        variance = n * (2 * p_gained + d * (1 - d))
        return (lost - gained - n * d) / np.sqrt(max(variance, 1e-300))

    lo, hi = (lost - gained) / n, 1.0
    if score(hi) >= -z:
        return 1.0
    for _ in range(60):  # the score falls as d grows: bisect
        mid = (lo + hi) / 2
        if score(mid) >= -z:
            lo = mid
        else:
            hi = mid
    return hi


def no_change_bound(n: float, level: float) -> float:
    """The bound of a count when no sample changed: the least any model can be given on n."""
    return count_bound(0, 0, n, level)


def samples_for(eps: float, level: float) -> int:
    """The fewest samples on which a count with no change bounds eps at `level`."""
    if eps <= 0:
        return 0
    z2 = float(norm.ppf(level)) ** 2
    n = int(np.ceil(z2 * (1 - eps) / eps))
    while no_change_bound(n, level) > eps:  # the bisection's last digit
        n += 1
    return n


def level_in_force(eps: float, samples: float, level: float) -> float | None:
    """`level`, or where a count on `samples` cannot bound eps at it even with no sample changed,
    the highest level at which it can (z^2 = n eps / (1 - eps)), to two decimals down; None when
    that is below MIN_LEVEL (a bound that holds about as often as not promises nothing)."""
    if eps <= 0 or no_change_bound(samples, level) <= eps:
        return level
    best = np.floor(float(norm.cdf(np.sqrt(samples * eps / (1 - eps)))) * 100) / 100
    return float(best) if best >= MIN_LEVEL else None


def counts_bound(lost: np.ndarray, gained: np.ndarray, level: float, groups: np.ndarray | None) -> Bound:
    """`lost`, `gained`: per sample, 0 or 1."""
    n = len(lost)
    lost_n, gained_n = float(lost.sum()), float(gained.sum())
    drop = (lost_n - gained_n) / n if n else 0.0
    count = None if groups is None else len(np.unique(groups))
    scale = n / effective_samples(n, groups)
    upper = count_bound(lost_n / scale, gained_n / scale, n / scale, level)
    return Bound(drop, max(upper, drop), level, n, count, "score")


def effective_samples(n: int, groups: np.ndarray | None) -> float:
    """Independent samples a count on `n` grouped ones is worth, a group's samples taken to change
    together: n over the size-weighted mean group size (the number of groups when they are equal)."""
    if groups is None or n == 0:
        return float(n)
    sizes = np.unique(groups, return_counts=True)[1].astype(float)
    return n * n / float(np.sum(sizes * sizes))


def studentized_bound(per_sample: np.ndarray, level: float, groups: np.ndarray | None, seed: int,
                      resamples: int) -> Bound:
    """`per_sample` (samples, outputs): what each sample adds to each output's drop, the drop being
    the largest output mean. Per output, the bootstrap-t bound of the mean over samples (or of the
    ratio estimator over whole groups: group totals over group sizes); the largest of them."""
    samples = len(per_sample)
    codes, units = _units(samples, groups)
    totals = np.stack([np.bincount(codes, weights=col, minlength=units) for col in per_sample.T], axis=1)
    sizes = np.bincount(codes, minlength=units).astype(float)
    drop = float(per_sample.mean(axis=0).max()) if samples else 0.0
    count = None if groups is None else units
    if _too_few(groups, units):
        return Bound(drop, float("inf"), level, samples, count, "bootstrap")

    def ratio_and_error(t: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per output: total over size, and its standard error (the linearized ratio's)."""
        r = t.sum(axis=0) / m.sum()
        z = (t - np.outer(m, r)) / m.mean()
        return r, np.sqrt(np.sum(z * z, axis=0)) / len(m)

    r, se = ratio_and_error(totals, sizes)
    rng = np.random.default_rng(seed)
    ts = []
    for _ in range(resamples):
        pick = rng.integers(0, units, units)
        rb, seb = ratio_and_error(totals[pick], sizes[pick])
        ts.append((rb - r) / np.maximum(seb, 1e-300))
    lower_t = np.quantile(np.array(ts), 1 - level, axis=0)  # per output
    upper = float(np.max(r - lower_t * se))
    return Bound(drop, max(upper, drop), level, samples, count, "bootstrap")


def bootstrap_bound(drop_of: Callable[[np.ndarray], float], samples: int, level: float,
                    groups: np.ndarray | None, seed: int, resamples: int) -> Bound:
    """The `level` quantile of drop_of(positions) over resamples of the samples with replacement
    (of whole groups, with `groups`); drop_of(all positions) is the drop."""
    rng = np.random.default_rng(seed)
    everything = np.arange(samples)
    codes, units = _units(samples, groups)
    count = None if groups is None else units
    drop = drop_of(everything)
    if _too_few(groups, units):
        return Bound(drop, float("inf"), level, samples, count, "bootstrap")
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes, minlength=units))[:-1])
    drops = [drop_of(np.concatenate([members[g] for g in rng.integers(0, units, units)])) for _ in range(resamples)]
    upper = float(np.quantile(drops, level)) if drops else drop
    return Bound(drop, max(upper, drop), level, samples, count, "bootstrap")


def _units(samples: int, groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """What a bootstrap draws: per sample, its unit (its group, or the sample itself), and how many."""
    codes = np.arange(samples) if groups is None else np.unique(groups, return_inverse=True)[1]
    return codes, (int(codes.max()) + 1 if samples else 0)


def _too_few(groups: np.ndarray | None, units: int) -> bool:
    """A resample of a few groups says nothing of the others."""
    return groups is not None and units < MIN_GROUPS
