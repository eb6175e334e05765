"""`--select vbmf`: ranks from empirical variational Bayesian matrix factorization (Nakajima et
al. 2013, global analytic solution), the estimate Kim et al. use for Tucker-2 and Kokhazadeh et al. and MUSCO
compare against: SVD layers from the weight matrix, Tucker-2 from its input- and output-channel
unfoldings. It reads the weights only, so it is not tuned to eps: the report states the drop it
gets."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from ...decompositions import tucker2
from ..search import Context, Search, Selection
from .fixed import at_rank


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def evbmf_rank(matrix: np.ndarray) -> int:
    """The number of components EVBMF keeps, the noise variance estimated too."""
    y = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    big_l, m = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = big_l / m
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)

    def objective(sigma2: float) -> float:  # the free energy as a function of the noise variance
        x = s ** 2 / (m * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        t = _tau(big, alpha)
        return float(np.sum(small - np.log(small)) + np.sum(big - t) + np.sum(np.log((t + 1) / big))
                     + alpha * np.sum(np.log(t / alpha + 1)))

    upper = float(np.sum(s ** 2) / (big_l * m))
    h = min(int(np.ceil(big_l / (1 + alpha))) - 1, big_l) - 1  # the most components EVBMF can keep
    lower = upper / 1e6
    if h + 1 < len(s):
        lower = max(s[h + 1] ** 2 / (m * x_bar), float(np.mean(s[h + 1:] ** 2)) / m)
    if not 0 < lower < upper:
        sigma2 = upper
    else:
        sigma2 = minimize_scalar(objective, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(m * sigma2 * x_bar)
    return int(np.sum(s > threshold))


def select(search: Search, ctx: Context) -> Selection:
    methods, cost = ctx.methods, ctx.cost
    choice, reasons = {}, {}
    for p in search.problems:
        method = p.preferred(methods)
        w = p.target.layer.weight.astype(np.float64)
        if method is None:
            choice[p.name], reasons[p.name] = p.keep, "kept: no method applies"
            continue
        if method == "tucker2":
            r1 = evbmf_rank(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1))
            r2 = evbmf_rank(w.reshape(w.shape[0], -1))
            rank = (max(r1, 1), max(r2, 1))
        else:
            rank = (max(evbmf_rank(w.reshape(w.shape[0], -1)), 1),)
        if method not in ("svd", "tucker2"):
            method = "tucker2" if tucker2.check(p.layer) is None else "svd"
        candidate = at_rank(p, method, rank if len(rank) > 1 else rank[0], cost)
        choice[p.name] = candidate
        reasons[p.name] = f"EVBMF rank {rank}" + ("" if candidate.factors else ": no cheaper than the layer, kept")
    search.drop(choice, "vbmf")
    return Selection(choice, reasons)
