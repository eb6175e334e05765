"""Phan et al.'s TKD-CPD: Tucker-2 first (C -> R1, T -> R2), then a CP of rank R of the (prod(k), R1, R2)
core, corrected by EPC. The layer becomes 1x1 (C -> R1) -> 1x1 (R1 -> R) -> depthwise k (R) ->
1x1 (R -> R2) -> 1x1 (R2 -> T); each adjacent pair of 1x1s is merged into one when that has
fewer parameters (when R is below the Tucker rank the block is a CPD block, Phan et al. section 3)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import cp, tucker2
from .base import ConvGeometry, ConvStep, Factors, Layer, RankSpec, Step, channel_whitener, conv_macs, normalize_ranks


class Tucker2CPFactors(Factors):
    method = "tucker2-cp"

    def __init__(self, layer: Layer, u: np.ndarray, v: np.ndarray, core_factors: list[np.ndarray]):
        super().__init__(layer)
        self.u = u  # (C, R1)
        self.v = v  # (T, R2)
        self.spatial, self.b, self.c = core_factors  # (P, R), (R1, R), (R2, R)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.u.shape[1], self.v.shape[1], self.spatial.shape[1])

    @property
    def merge_in(self) -> bool:
        c, r1 = self.u.shape
        r = self.b.shape[1]
        return r * c <= r1 * c + r * r1

    @property
    def merge_out(self) -> bool:
        t, r2 = self.v.shape
        r = self.c.shape[1]
        return t * r <= r * r2 + r2 * t

    def reconstruct(self) -> np.ndarray:
        factors = [self.spatial, self.u @ self.b, self.v @ self.c]
        return cp.from_cp_tensor(cp.cp_to_tensor(factors), self.layer.weight.shape, 3)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        ones = (1,) * g.ndim
        point = ConvGeometry.pointwise(g.ndim)
        r = self.ranks[2]

        def pointwise(matrix: np.ndarray, bias=None) -> ConvStep:  # matrix is (out, in)
            return ConvStep(matrix.reshape(matrix.shape + ones), point, bias=bias)

        if self.merge_in:
            steps = [pointwise((self.u @ self.b).T)]
        else:
            steps = [pointwise(self.u.T), pointwise(self.b.T)]
        steps.append(ConvStep(self.spatial.T.reshape((r, 1) + g.kernel), g, group=r))
        bias = self.layer.bias
        if self.merge_out:
            steps.append(pointwise(self.v @ self.c, bias))
        else:
            steps += [pointwise(self.c), pointwise(self.v, bias)]
        return steps

    @property
    def weight_params(self) -> int:
        (c, r1), (t, r2), r = self.u.shape, self.v.shape, self.ranks[2]
        n = r * self.spatial.shape[0]
        n += r * c if self.merge_in else r1 * c + r * r1
        n += t * r if self.merge_out else r * r2 + r2 * t
        return n

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        g = self.layer.geometry
        out = g.out_size(in_spatial)
        (c, r1), (t, r2), r = self.u.shape, self.v.shape, self.ranks[2]
        macs = conv_macs(r, 1, g.kernel, out)
        macs += conv_macs(r, c, (), in_spatial) if self.merge_in else conv_macs(r1 * c + r * r1, 1, (), in_spatial)
        macs += conv_macs(t, r, (), out) if self.merge_out else conv_macs(r * r2 + r2 * t, 1, (), out)
        return macs

    def sensitivity(self) -> float:
        return cp.sensitivity([self.spatial, self.b, self.c])


def check(layer: Layer) -> str | None:
    return cp.check(layer)


def factorize(layer: Layer, rank: RankSpec = "full", correct: bool = True, iterations: int = 300,
              seed: int = 0) -> Tucker2CPFactors:
    """`rank`: (R1, R2, R) — each an int or a fraction of its full value — or "full"."""
    white = channel_whitener(layer)
    w = layer.weight.astype(np.float64)
    if white is not None:
        w = white.into(w, 1)
    full_tucker = tucker2.full_ranks(layer)
    if isinstance(rank, str):
        r1, r2 = normalize_ranks(rank, full_tucker)
        cp_rank: RankSpec = rank
    else:
        if not isinstance(rank, (tuple, list)) or len(rank) != 3:
            raise ValueError(f"tucker2-cp takes ranks (R1, R2, R) or 'full'; got {rank!r}")
        r1, r2 = normalize_ranks(rank[:2], full_tucker)
        cp_rank = rank[2]
    if (r1, r2) == (w.shape[1], w.shape[0]):
        u, v = np.eye(r1), np.eye(r2)  # the Tucker step is exact and needs no rotation
    else:
        u, v = tucker2.hooi(w, r1, r2)
    core = tucker2.project(w, u, v)                    # (R2, R1, *k)
    tensor = core.reshape(r2, r1, -1).transpose(2, 1, 0)  # (P, R1, R2)
    factors = cp.fit(tensor, cp_rank, correct, iterations, seed)
    return Tucker2CPFactors(layer, u if white is None else white.back(u, 0), v, factors)
