"""Spatial SVD (Jaderberg et al.; AIMET): the kernel reshaped to (C*D1, T*D2) and truncated, so
a DxD conv becomes a Dx1 conv (C -> r) followed by a 1xD conv (r -> T). The vertical stride,
padding and dilation go to the first conv, the horizontal ones to the second."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvStep, Factors, Layer, RankSpec, Step, check_eps, choose_rank, conv_macs,
                   conv_reason, normalize_ranks)


class SpatialSVDFactors(Factors):
    method = "spatial-svd"

    def __init__(self, layer: Layer, vertical: np.ndarray, horizontal: np.ndarray):
        super().__init__(layer)
        self.vertical = vertical      # (r, C, D1, 1)
        self.horizontal = horizontal  # (T, r, 1, D2)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.vertical.shape[0],)

    def reconstruct(self) -> np.ndarray:
        return np.einsum("trb,rca->tcab", self.horizontal[:, :, 0, :], self.vertical[..., 0], optimize=True)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        return [ConvStep(self.vertical, g.along([0])),
                ConvStep(self.horizontal, g.along([1]), bias=self.layer.bias)]

    @property
    def weight_params(self) -> int:
        return self.vertical.size + self.horizontal.size

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        g = self.layer.geometry
        mid = g.along([0]).out_size(in_spatial)
        out = g.along([1]).out_size(mid)
        r, c, d1, _ = self.vertical.shape
        t, _, _, d2 = self.horizontal.shape
        return conv_macs(r, c, (d1,), mid) + conv_macs(t, r, (d2,), out)


def check(layer: Layer) -> str | None:
    return conv_reason(layer, "spatial-svd", [2])


def factorize(layer: Layer, rank: RankSpec | None = None, eps: float | None = None) -> SpatialSVDFactors:
    check_eps(eps)
    w = layer.weight.astype(np.float64)
    t, c, d1, d2 = w.shape
    matrix = w.transpose(1, 2, 0, 3).reshape(c * d1, t * d2)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    if rank is not None:
        (r,) = normalize_ranks(rank, [len(s)])
    else:
        r = choose_rank(s, None, (eps or 0.0) * np.linalg.norm(s), None)
    root = np.sqrt(s[:r])
    vertical = (u[:, :r] * root).T.reshape(r, c, d1, 1)
    horizontal = (root[:, None] * vt[:r]).reshape(r, t, d2).transpose(1, 0, 2)[:, :, None, :]
    return SpatialSVDFactors(layer, vertical, horizontal)
