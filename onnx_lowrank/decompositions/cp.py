"""CP decomposition of a conv kernel (Lebedev et al.; Yang & Liu; Phan et al.) with Phan et al.'s error-preserving
correction (EPC).

3-way: the kernel as a (prod(k), C, T) tensor = [[A, B, C]] and the layer becomes
1x1 (C -> R) -> depthwise k (R, the original geometry) -> 1x1 (R -> T). Any spatial rank.
4-way (2-D kernels): (D1, D2, C, T) = [[A1, A2, B, C]] and the depthwise conv splits into a
depthwise Dx1 (vertical geometry) and a depthwise 1xD (horizontal geometry).

ALS alone often ends in a degenerate CP: huge rank-1 terms that cancel, whose sensitivity to
small perturbations of the factors breaks fine-tuning (Phan et al., Fig. 2). EPC then minimises the
sensitivity ss = sum_n sum_r prod_{m != n} ||u_r^(m)||^2 (Phan et al. Lemma 1, for any number of ways)
subject to keeping the ALS error: ||X - [[U]]||^2 <= delta^2 (Phan et al. eq. 10).

Each EPC update is the ridge problem of Phan et al. eq. 12, solved in closed form: with the other factors
fixed, Z their Khatri-Rao product and w_r^2 the weights of the sensitivity terms that contain
factor n, the minimiser of ||U diag(w)||^2 under the error bound is
U diag(w) = X_(n) Z~ (Z~^T Z~ + mu I)^-1 with Z~ = Z diag(w)^-1, and the multiplier mu >= 0 found
by a scalar root search so that the error equals delta^2 (mu = 0 when least squares already sits
on the bound). Through an eigendecomposition of Z~^T Z~ the error is a closed-form function of mu.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy.optimize import brentq

from .base import (ConvGeometry, ConvStep, Factors, Layer, RankSpec, Step, channel_whitener, conv_macs, conv_reason,
                   normalize_ranks)


class CPFactors(Factors):
    """factors: the spatial factor(s) first (one for 3-way, two for 4-way), then B (C x R) and
    C (T x R)."""

    method = "cp"

    def __init__(self, layer: Layer, factors: list[np.ndarray]):
        super().__init__(layer)
        self.factors = factors

    @property
    def ways(self) -> int:
        return len(self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.factors[0].shape[1],)

    def reconstruct(self) -> np.ndarray:
        return from_cp_tensor(cp_to_tensor(self.factors), self.layer.weight.shape, self.ways)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        r = self.ranks[0]
        ones = (1,) * g.ndim
        point = ConvGeometry.pointwise(g.ndim)
        *spatial, b, c = self.factors
        steps = [ConvStep(b.T.reshape((r, b.shape[0]) + ones), point)]
        if len(spatial) == 1:
            steps.append(ConvStep(spatial[0].T.reshape((r, 1) + g.kernel), g, group=r))
        else:
            a1, a2 = spatial
            steps.append(ConvStep(a1.T.reshape(r, 1, -1, 1), g.along([0]), group=r))
            steps.append(ConvStep(a2.T.reshape(r, 1, 1, -1), g.along([1]), group=r))
        steps.append(ConvStep(c.reshape(c.shape + ones), point, bias=self.layer.bias))
        return steps

    @property
    def weight_params(self) -> int:
        return sum(f.size for f in self.factors)

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        g = self.layer.geometry
        r = self.ranks[0]
        *spatial, b, c = self.factors
        out = g.out_size(in_spatial)
        macs = conv_macs(r, b.shape[0], (), in_spatial) + conv_macs(c.shape[0], r, (), out)
        if len(spatial) == 1:
            return macs + conv_macs(r, 1, g.kernel, out)
        mid = g.along([0]).out_size(in_spatial)
        return macs + conv_macs(r, 1, (g.kernel[0],), mid) + conv_macs(r, 1, (g.kernel[1],), out)

    def sensitivity(self) -> float:
        return sensitivity(self.factors)


# ---- tensor layout -------------------------------------------------------------------------

def to_cp_tensor(weight: np.ndarray, ways: int) -> np.ndarray:
    """(T, C, *k) -> (prod(k), C, T) for 3 ways, (D1, D2, C, T) for 4."""
    t, c = weight.shape[:2]
    if ways == 3:
        return weight.reshape(t, c, -1).transpose(2, 1, 0)
    return weight.transpose(2, 3, 1, 0)


def from_cp_tensor(tensor: np.ndarray, shape: tuple[int, ...], ways: int) -> np.ndarray:
    if ways == 3:
        return tensor.transpose(2, 1, 0).reshape(shape)
    return tensor.transpose(3, 2, 0, 1)


def cp_to_tensor(factors: Sequence[np.ndarray]) -> np.ndarray:
    letters = "abcdefgh"[: len(factors)]
    return np.einsum(",".join(f"{ch}z" for ch in letters) + "->" + letters, *factors, optimize=True)


# ---- degeneracy measures (Phan et al. eqs. 3-5) -----------------------------------------------------

def _column_norms2(factors: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sum(f * f, axis=0) for f in factors]


def sensitivity_terms(factors: Sequence[np.ndarray]) -> list[float]:
    """Per mode n: sum over r of the product of the other factors' squared column norms."""
    n2 = _column_norms2(factors)
    return [float(np.prod([n2[m] for m in range(len(factors)) if m != n], axis=0).sum())
            for n in range(len(factors))]


def sensitivity(factors: Sequence[np.ndarray]) -> float:
    """Phan et al. Lemma 1 (eq. 5), for any number of ways: the sum of `sensitivity_terms`.

    The limit in Phan et al.'s definition (eq. 4) weighs mode n's term by that mode's size I_n rather
    than by R: step (7) of the proof replaces tr(M kron I_{I_n}) by R tr(M). We use Lemma 1 as
    printed, the measure Phan et al. minimises and reports; the test checks both against eq. 4."""
    return sum(sensitivity_terms(factors))


def intensities(factors: Sequence[np.ndarray]) -> np.ndarray:
    """Frobenius norm of each rank-1 term."""
    return np.prod([np.sqrt(x) for x in _column_norms2(factors)], axis=0)


# ---- ALS and EPC ------------------------------------------------------------------------------

def exact_cp(tensor: np.ndarray) -> list[np.ndarray]:
    """An exact CP by construction: one rank-1 term per entry of every mode but the largest,
    whose fibre becomes that term's factor. Rank = product of the other dimensions."""
    keep = int(np.argmax(tensor.shape))
    others = [m for m in range(tensor.ndim) if m != keep]
    dims = [tensor.shape[m] for m in others]
    rank = math.prod(dims)
    fibres = np.moveaxis(tensor, keep, -1).reshape(rank, tensor.shape[keep])
    index = np.unravel_index(np.arange(rank), dims)
    factors: list[np.ndarray] = [None] * tensor.ndim  # type: ignore[list-item]
    factors[keep] = fibres.T.copy()
    for m, idx in zip(others, index):
        factors[m] = np.eye(tensor.shape[m])[:, idx]
    return factors


def exact_rank(shape: Sequence[int]) -> int:
    return math.prod(shape) // max(shape)


def als(tensor: np.ndarray, rank: int, iterations: int = 300, seed: int = 0) -> list[np.ndarray]:
    """tensorly's ALS from an SVD start; the weights folded into the first factor.

    The stopping tolerance is tight on purpose: ALS crosses long "swamps" where the error barely
    moves, and a looser rule (1e-9) stopped there at a few percent error on tensors of exact low
    rank that it then recovers to 1e-8. `iterations` is what bounds the cost."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    with warnings.catch_warnings():
        # the SVD start asks for more vectors than a short mode has and tensorly fills them
        # with random ones, warning each time
        warnings.simplefilter("ignore", UserWarning)
        weights, factors = parafac(tensor, rank, n_iter_max=iterations, init="svd", tol=1e-12,
                                   random_state=seed)
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    factors[0] = factors[0] * np.asarray(weights)
    return factors


def _mttkrp(tensor: np.ndarray, factors: Sequence[np.ndarray], mode: int) -> np.ndarray:
    """X_(n) times the Khatri-Rao product of the other factors, as an einsum (no unfolding)."""
    letters = "abcdefgh"[: tensor.ndim]
    ins = [letters] + [f"{letters[m]}z" for m in range(tensor.ndim) if m != mode]
    ops = [tensor] + [factors[m] for m in range(tensor.ndim) if m != mode]
    return np.einsum(",".join(ins) + f"->{letters[mode]}z", *ops, optimize=True)


def _epc_update(tensor: np.ndarray, norm2: float, factors: list[np.ndarray], mode: int,
                delta2: float) -> np.ndarray:
    n2 = _column_norms2(factors)
    others = [m for m in range(len(factors)) if m != mode]
    # weight of factor `mode`'s column r in the sensitivity: the sum, over the terms that contain
    # it, of the products of the remaining factors' squared norms
    w2 = np.zeros_like(n2[mode])
    for m in others:
        w2 += np.prod([n2[k] for k in others if k != m], axis=0) if len(others) > 1 else 1.0
    w = np.sqrt(np.maximum(w2, 1e-300))

    gram = np.prod([factors[m].T @ factors[m] for m in others], axis=0)  # Z^T Z
    gram_w = gram / np.outer(w, w)                                     # Z~^T Z~
    kz = _mttkrp(tensor, factors, mode) / w                             # X_(n) Z~
    lam, q = np.linalg.eigh(gram_w)
    keep = lam > lam.max() * 1e-12
    lam, q = lam[keep], q[:, keep]
    p = kz @ q
    p2 = np.sum(p * p, axis=0)

    ls_error = norm2 - np.sum(p2 / lam)
    room = delta2 - ls_error  # how much error the ridge may add above least squares

    def added(mu: float) -> float:  # error(mu) - error(0), no cancellation
        return float(np.sum(p2 * mu * mu / (lam * (lam + mu) ** 2)))

    mu = 0.0
    if room > 0 and np.sum(p2 / lam) > room:  # the sum is the limit of added(mu) as mu grows
        hi = float(lam.max())
        while added(hi) < room:
            hi *= 4.0
        mu = brentq(lambda m: added(m) - room, 0.0, hi, xtol=1e-14 * hi, rtol=1e-12)
    a_tilde = (p / (lam + mu)) @ q.T
    return a_tilde / w


def epc(tensor: np.ndarray, factors: Sequence[np.ndarray], delta2: float | None = None,
        sweeps: int = 100, tol: float = 1e-6) -> list[np.ndarray]:
    """Phan et al.'s error-preserving correction: cycle over the modes, each update minimising the
    sensitivity with the others fixed while the error stays at delta^2 (by default the error of
    the factors given). Stops when a sweep lowers the sensitivity by less than `tol` (relative)."""
    factors = [np.array(f, dtype=np.float64) for f in factors]
    norm2 = float(np.sum(tensor * tensor))
    if delta2 is None:
        delta2 = float(np.sum((tensor - cp_to_tensor(factors)) ** 2))
    before = sensitivity(factors)
    for _ in range(sweeps):
        for mode in range(len(factors)):
            factors[mode] = _epc_update(tensor, norm2, factors, mode, delta2)
        now = sensitivity(factors)
        if before - now <= tol * before:
            break
        before = now
    return factors


# ---- method ----------------------------------------------------------------------------------

def check(layer: Layer, ways: int = 3) -> str | None:
    reason = conv_reason(layer, "cp", [1, 2, 3] if ways == 3 else [2])
    if reason is None and all(k == 1 for k in layer.kernel):
        return "1x1 kernel: cp reduces to svd there"
    return reason


def factorize(layer: Layer, rank: RankSpec = "full", ways: int = 3, correct: bool = True,
              iterations: int = 300, seed: int = 0) -> CPFactors:
    """CP of rank R: ALS then (with `correct`) Phan et al.'s EPC at the ALS error. A rank at or past
    `exact_rank` (or "full") gives the exact CP by construction instead."""
    if ways not in (3, 4):
        raise ValueError(f"cp takes ways=3 or ways=4; got {ways}")
    white = channel_whitener(layer)
    w = layer.weight.astype(np.float64)
    tensor = to_cp_tensor(w if white is None else white.into(w, 1), ways)
    factors = fit(tensor, rank, correct, iterations, seed)
    if white is not None:
        factors[-2] = white.back(factors[-2], 0)  # the input-channel factor B
    return CPFactors(layer, factors)


def fit(tensor: np.ndarray, rank: RankSpec, correct: bool = True, iterations: int = 300,
        seed: int = 0) -> list[np.ndarray]:
    """CP factors of `tensor`: exact by construction at or past `exact_rank`, else ALS followed
    (with `correct`) by EPC at the ALS error."""
    full = exact_rank(tensor.shape)
    (r,) = normalize_ranks(rank, [full])
    if r >= full:
        return exact_cp(tensor)
    factors = als(tensor, r, iterations=iterations, seed=seed)
    return epc(tensor, factors) if correct else factors
