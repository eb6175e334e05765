"""Tucker-2 of a conv kernel (Kim et al.; Kokhazadeh et al.; Phan et al. section 2.4): W (T, C, *k) ~ G x_C U x_T V with
orthonormal U (C x R1) and V (T x R2). The layer becomes 1x1 (C -> R1), the core conv
(R1 -> R2, the original kernel and geometry), 1x1 (R2 -> T).

Ranks given: HOSVD, refined by HOOI. An error bound given: Phan et al.'s smallest Tucker-2 meeting it,
found by the sequential eigen-decompositions of Lemma 2 (eqs. 16-18).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvGeometry, ConvStep, Factors, Layer, RankSpec, Step, channel_whitener, check_eps, conv_macs,
                   conv_reason, normalize_ranks, relative_errors)


class Tucker2Factors(Factors):
    method = "tucker2"

    def __init__(self, layer: Layer, u: np.ndarray, core: np.ndarray, v: np.ndarray):
        super().__init__(layer)
        self.u = u        # (C, R1)
        self.core = core  # (R2, R1, *k)
        self.v = v        # (T, R2)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.u.shape[1], self.v.shape[1])

    def reconstruct(self) -> np.ndarray:
        return expand(self.core, self.u, self.v)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        ones = (1,) * g.ndim
        point = ConvGeometry.pointwise(g.ndim)
        return [ConvStep(self.u.T.reshape(self.u.T.shape + ones), point),
                ConvStep(self.core, g),
                ConvStep(self.v.reshape(self.v.shape + ones), point, bias=self.layer.bias)]

    @property
    def weight_params(self) -> int:
        return self.u.size + self.core.size + self.v.size

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        r1, r2 = self.ranks
        c, t = self.u.shape[0], self.v.shape[0]
        out = self.layer.geometry.out_size(in_spatial)
        return (conv_macs(r1, c, (), in_spatial) + conv_macs(r2, r1, self.layer.kernel, out)
                + conv_macs(t, r2, (), out))


def project(w: np.ndarray, u: np.ndarray | None, v: np.ndarray | None) -> np.ndarray:
    """W x_C U^T x_T V^T (either projection skipped when None)."""
    if u is not None:  # tensordot: BLAS, where einsum would loop in C
        w = np.moveaxis(np.tensordot(w, u, axes=([1], [0])), -1, 1)
    if v is not None:
        w = np.moveaxis(np.tensordot(w, v, axes=([0], [0])), -1, 0)
    return w


def expand(core: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """G x_C U x_T V."""
    return np.einsum("sr...,cr,ts->tc...", core, u, v, optimize=True)


def _in_gram(w: np.ndarray) -> np.ndarray:
    """Gram matrix of the input-channel unfolding (Phan et al.'s Q1 once W is projected by V)."""
    m = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    return m @ m.T


def _out_gram(w: np.ndarray) -> np.ndarray:
    m = w.reshape(w.shape[0], -1)
    return m @ m.T


def _leading(gram: np.ndarray, rank: int) -> np.ndarray:
    vals, vecs = np.linalg.eigh(gram)
    return vecs[:, ::-1][:, :rank]


def _smallest_meeting(gram: np.ndarray, need: float) -> np.ndarray:
    """Fewest principal eigenvectors whose eigenvalues sum to at least `need` (Phan et al., eq. 17)."""
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    kept = np.cumsum(vals)
    r = int(np.searchsorted(kept, need * (1 - 1e-12)) + 1)
    return vecs[:, : max(1, min(r, len(vals)))]


def hooi(w: np.ndarray, r1: int, r2: int, iterations: int = 20, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """HOSVD initialisation, then alternating HOOI updates until the captured energy settles."""
    u = _leading(_in_gram(w), r1)
    v = _leading(_out_gram(w), r2)
    captured = np.linalg.norm(project(w, u, v)) ** 2
    for _ in range(iterations):
        u = _leading(_in_gram(project(w, None, v)), r1)
        v = _leading(_out_gram(project(w, u, None)), r2)
        now = np.linalg.norm(project(w, u, v)) ** 2
        if now - captured <= tol * max(now, 1e-300):
            break
        captured = now
    return u, v


def smallest_with_bound(w: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Phan et al.'s Tucker-2 with the fewest parameters R1*C + R2*T + R1*R2*D^2 whose error is <= delta.

    U and V are updated in turn, each as the fewest principal eigenvectors of its Gram matrix
    (given the other factor) that keep ||W||^2 - delta^2 of the energy. Each update keeps the
    bound and never needs more columns than the factor it replaces, so the ranks only fall.
    Both update orders are tried and the smaller model kept."""
    need = np.linalg.norm(w) ** 2 - delta ** 2
    kernel = int(np.prod(w.shape[2:]))
    c, t = w.shape[1], w.shape[0]
    best = None
    for u_first in (True, False):
        u = v = None
        ranks = None
        for _ in range(50):
            if u_first or u is not None:
                u = _smallest_meeting(_in_gram(project(w, None, v)), need)
                v = _smallest_meeting(_out_gram(project(w, u, None)), need)
            else:
                v = _smallest_meeting(_out_gram(w), need)
                u = _smallest_meeting(_in_gram(project(w, None, v)), need)
            now = (u.shape[1], v.shape[1])
            if now == ranks:
                break
            ranks = now
        cost = u.shape[1] * c + v.shape[1] * t + u.shape[1] * v.shape[1] * kernel
        if best is None or cost < best[0]:
            best = (cost, u, v)
    return best[1], best[2]


class Truncations:
    """HOSVD of a layer (whitened when data-aware) once; any (R1, R2) by slicing its bases.
    HOSVD bases are nested, so this is what `factorize(algorithm="hosvd")` gives at each rank;
    so is the core: the one of the full bases, sliced."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.white = channel_whitener(layer)
        w = layer.weight.astype(np.float64)
        w = w if self.white is None else self.white.into(w, 1)  # not kept: the core holds what rungs need
        u_all = _leading(_in_gram(w), w.shape[1])
        self.v_all = _leading(_out_gram(w), w.shape[0])
        self.u_back = u_all if self.white is None else self.white.back(u_all, 0)  # once
        self.core = project(w, u_all, self.v_all)
        # kept in the weight's precision, which the rungs are written in
        precision = np.promote_types(layer.weight.dtype, np.float32)
        self.u_back, self.core, self.v_all = (a.astype(precision) for a in (self.u_back, self.core, self.v_all))

    def output_errors(self, pairs: Sequence[tuple[int, int]], root: np.ndarray, product: np.ndarray) -> list[float]:
        """Relative output errors ||(W - W_r) R|| / ||W R|| at each (R1, R2), R (C*k, m) a root of
        the input second moment and `product` W R (float32), with one pass over R instead of one
        full product per pair. W_r = V V^T Y with Y = W x_C (U_back U^T) growing with R1, and
        V V^T an orthogonal projection onto R2 of the output basis, so with A = V_all^T W R and
        B = V_all^T Y R: ||(W - W_r) R||^2 = sum over rows s >= R2 of ||A_s||^2 plus over
        s < R2 of ||A_s - B_s||^2 (no cancellation of large terms)."""
        w = self.layer.weight
        t, c, k = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
        m = root.shape[1]
        order = sorted(set(pairs))
        top = max(r1 for r1, _ in order)
        z = (self.u_back[:, :top].T.astype(np.float32) @ root.reshape(c, k * m)).reshape(top * k, m)
        y = self.core[:, :top].reshape(t, top * k).astype(np.float32)  # (output basis, (R1 index, kernel))
        a = self.v_all.T.astype(np.float32) @ product
        rows = np.sum(np.square(a), axis=1, dtype=np.float64)
        tail = np.append(np.cumsum(rows[::-1])[::-1], 0.0)
        b = np.zeros((t, m), np.float32)
        squared, prev, head = {}, 0, np.zeros(1)
        for r1, r2 in order:
            if r1 > prev:
                b += y[:, prev * k:r1 * k] @ z[prev * k:r1 * k]
                head = np.append(0.0, np.cumsum(np.sum(np.square(a - b), axis=1, dtype=np.float64)))
                prev = r1
            squared[(r1, r2)] = tail[r2] + head[r2]
        return relative_errors(squared, product, [tuple(p) for p in pairs])

    def at(self, r1: int, r2: int) -> Tucker2Factors:
        return Tucker2Factors(self.layer, self.u_back[:, :r1], self.core[:r2, :r1].copy(), self.v_all[:, :r2])


def full_ranks(layer: Layer) -> tuple[int, int]:
    """Ranks past which Tucker-2 is exact: each is capped by its unfolding's other side."""
    w = layer.weight
    t, c, k = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
    return min(c, t * k), min(t, c * k)


def check(layer: Layer) -> str | None:
    reason = conv_reason(layer, "tucker2")
    if reason is None and all(k == 1 for k in layer.kernel):
        return "1x1 kernel: tucker2 reduces to svd there"
    return reason


def factorize(layer: Layer, rank: RankSpec | None = None, eps: float | None = None,
              algorithm: str = "hooi") -> Tucker2Factors:
    """`rank`: (R1, R2) or anything `normalize_ranks` takes; `algorithm` hosvd or hooi.
    `eps`: the smallest Tucker-2 with relative error <= eps (Phan et al.)."""
    check_eps(eps)
    white = channel_whitener(layer)
    w = layer.weight.astype(np.float64)
    if white is not None:
        w = white.into(w, 1)  # factor what the layer applies to whitened inputs
    if rank is None:
        u, v = smallest_with_bound(w, (eps or 0.0) * np.linalg.norm(w))
    else:
        r1, r2 = normalize_ranks(rank, full_ranks(layer))
        if algorithm == "hosvd":
            u, v = _leading(_in_gram(w), r1), _leading(_out_gram(w), r2)
        elif algorithm == "hooi":
            u, v = hooi(w, r1, r2)
        else:
            raise ValueError(f"algorithm must be hosvd or hooi; got {algorithm!r}")
    core = project(w, u, v)
    return Tucker2Factors(layer, u if white is None else white.back(u, 0), core, v)
