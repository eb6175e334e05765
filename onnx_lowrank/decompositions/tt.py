"""TTPWT's TTPWT: tensor train of the circularly permuted kernel. W (T, C, D1, D2) is permuted to
(C, D1, D2, T) so the outer cores are matrices (C x R1, R3 x T) that become 1x1 convs and the
inner cores become a Dx1 conv (R1 -> R2, vertical geometry) and a 1xD conv (R2 -> R3, horizontal
geometry). Without the permutation R2 and R3 could not exceed D^2 and D (TTPWT, Remark 1).

TT-SVD (TTPWT Algorithm 1) truncates each sequential SVD by one of: explicit ranks; a prescribed
relative error eps, each step's tail bounded by eps * ||W|| / sqrt(N - 1), so the total error is
at most eps (Oseledets); or an energy threshold, each step keeping the fewest singular values
that hold that share of the step's energy (TTPWT eq. 14, the thresholds of its Tables 2-5).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvGeometry, ConvStep, Factors, Layer, RankSpec, Step, channel_whitener, check_eps, choose_rank,
                   conv_macs, conv_reason, normalize_ranks)


class TTFactors(Factors):
    method = "tt"

    def __init__(self, layer: Layer, cores: list[np.ndarray]):
        super().__init__(layer)
        self.cores = cores  # (1, C, R1), (R1, D1, R2), (R2, D2, R3), (R3, T, 1)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(core.shape[2] for core in self.cores[:-1])

    def reconstruct(self) -> np.ndarray:
        g1, g2, g3, g4 = self.cores
        permuted = np.einsum("ca,axb,byd,dt->cxyt", g1[0], g2, g3, g4[:, :, 0], optimize=True)
        return permuted.transpose(3, 0, 1, 2)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        g1, g2, g3, g4 = self.cores
        point = ConvGeometry.pointwise(2)
        return [ConvStep(g1[0].T[:, :, None, None], point),
                ConvStep(g2.transpose(2, 0, 1)[:, :, :, None], g.along([0])),
                ConvStep(g3.transpose(2, 0, 1)[:, :, None, :], g.along([1])),
                ConvStep(g4[:, :, 0].T[:, :, None, None], point, bias=self.layer.bias)]

    @property
    def weight_params(self) -> int:
        return sum(core.size for core in self.cores)

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        g = self.layer.geometry
        (c, t), (r1, r2, r3) = (self.cores[0].shape[1], self.cores[3].shape[1]), self.ranks
        d1, d2 = g.kernel
        mid = g.along([0]).out_size(in_spatial)
        out = g.out_size(in_spatial)
        return (conv_macs(r1, c, (), in_spatial) + conv_macs(r2, r1, (d1,), mid)
                + conv_macs(r3, r2, (d2,), out) + conv_macs(t, r3, (), out))


def tt_svd(tensor: np.ndarray, ranks: Sequence[int] | None = None, delta: float | None = None,
           energy: float | None = None) -> list[np.ndarray]:
    """Sequential truncated SVDs (Oseledets' TT-SVD). Cores (R_{k-1}, I_k, R_k), R_0 = R_N = 1."""
    dims = tensor.shape
    cores = []
    rest = tensor.reshape(1, -1)
    for k in range(len(dims) - 1):
        left = rest.shape[0]
        u, s, vt = np.linalg.svd(rest.reshape(left * dims[k], -1), full_matrices=False)
        r = choose_rank(s, None if ranks is None else ranks[k], delta, energy)
        cores.append(u[:, :r].reshape(left, dims[k], r))
        rest = s[:r, None] * vt[:r]
    cores.append(rest.reshape(rest.shape[0], dims[-1], 1))
    return cores


def full_ranks(layer: Layer) -> tuple[int, int, int]:
    t, c, d1, d2 = layer.weight.shape
    return min(c, d1 * d2 * t), min(c * d1, d2 * t), min(c * d1 * d2, t)


def check(layer: Layer, **_) -> str | None:
    return conv_reason(layer, "tt", [2])


def factorize(layer: Layer, rank: RankSpec | None = None, eps: float | None = None,
              energy: float | None = None) -> TTFactors:
    """Exactly one of `rank` ((R1, R2, R3), an int or a fraction), `eps` or `energy`; none gives
    the exact TT."""
    check_eps(eps)
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy is a share in (0, 1]; got {energy}")
    white = channel_whitener(layer)
    w = layer.weight.astype(np.float64)
    if white is not None:
        w = white.into(w, 1)
    permuted = w.transpose(1, 2, 3, 0)  # (C, D1, D2, T)
    if rank is not None:
        cores = tt_svd(permuted, ranks=normalize_ranks(rank, full_ranks(layer)))
    elif energy is not None:
        cores = tt_svd(permuted, energy=energy)
    else:
        cores = tt_svd(permuted, delta=(eps or 0.0) * np.linalg.norm(w) / np.sqrt(3))
    if white is not None:
        cores[0] = white.back(cores[0], 1)
    return TTFactors(layer, cores)
