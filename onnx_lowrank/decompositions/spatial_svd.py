"""Spatial SVD (Jaderberg et al.; AIMET): the kernel reshaped to (C*D1, T*D2) and truncated, so
a DxD conv becomes a Dx1 conv (C -> r) followed by a 1xD conv (r -> T). The vertical stride,
padding and dilation go to the first conv, the horizontal ones to the second."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvStep, Factors, Layer, RankSpec, Step, Whitener, check_eps, choose_rank, conv_macs, conv_reason,
                   normalize_ranks, relative_errors, thin_svd)


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


def vertical_cov(cov: np.ndarray, c: int, d1: int, d2: int) -> np.ndarray:
    """The second moment of the Dx1 conv's (C, D1) input patches, from that of the full (C, D1,
    D2) patches: the blocks where both sides sit in the same column, averaged over columns. (It
    leaves out how different columns correlate, which the two-conv chain cannot use anyway.)"""
    blocks = cov.reshape(c, d1, d2, c, d1, d2)
    return np.einsum("abkdek->abde", blocks).reshape(c * d1, c * d1) / d2


def check(layer: Layer) -> str | None:
    return conv_reason(layer, "spatial-svd", [2])


class Truncations:
    """One SVD of the reshaped kernel (whitened when data-aware), truncated at any rank."""

    def __init__(self, layer: Layer):
        self.layer = layer
        w = layer.weight.astype(np.float64)
        t, c, d1, d2 = w.shape
        matrix = w.transpose(1, 2, 0, 3).reshape(c * d1, t * d2)
        self.white = None if layer.input_cov is None else Whitener(vertical_cov(layer.input_cov, c, d1, d2))
        u, self.s, vt = thin_svd(matrix if self.white is None else self.white.into(matrix, 0))
        precision = np.promote_types(layer.weight.dtype, np.float32)  # the rungs are written in it
        self.left = (u if self.white is None else self.white.back(u, 0)).astype(precision)  # once, for every rank
        self.vt = vt.astype(precision)

    @property
    def full(self) -> int:
        return len(self.s)

    def output_errors(self, ranks: Sequence[int], root: np.ndarray, product: np.ndarray) -> list[float]:
        """Relative output errors ||(W - W_r) R|| / ||W R|| at each rank, R (C*D1*D2, m) a root of
        the input second moment and `product` W R (float32). W_r R is a sum over the rank-one
        terms: each term's vertical factor meets R once, and the sum grows along the ranks,
        instead of one full (T x d x m) product per rank."""
        t, c, d1, d2 = self.layer.weight.shape
        m = root.shape[1]
        order = sorted(set(ranks))
        top = order[-1]
        scale = np.sqrt(self.s[:top])
        vertical = (self.left[:, :top] * scale).T.astype(np.float32)  # (r, C*D1)
        horizontal = (scale[:, None] * self.vt[:top]).reshape(top, t, d2).astype(np.float32)
        q = (vertical @ root.reshape(c * d1, d2 * m)).reshape(top, d2, m)  # vertical factors applied to R
        approx = np.zeros((t, m), np.float32)
        squared, prev = {}, 0
        for r in order:
            approx += horizontal[prev:r].transpose(1, 0, 2).reshape(t, -1) @ q[prev:r].reshape(-1, m)
            squared[r] = float(np.sum(np.square(product - approx), dtype=np.float64))
            prev = r
        return relative_errors(squared, product, ranks)

    def at(self, r: int) -> SpatialSVDFactors:
        t, c, d1, d2 = self.layer.weight.shape
        root = np.sqrt(self.s[:r])
        vertical = (self.left[:, :r] * root).T.reshape(r, c, d1, 1)
        horizontal = (root[:, None] * self.vt[:r]).reshape(r, t, d2).transpose(1, 0, 2)[:, :, None, :]
        return SpatialSVDFactors(self.layer, vertical, horizontal)


def factorize(layer: Layer, rank: RankSpec | None = None, eps: float | None = None) -> SpatialSVDFactors:
    check_eps(eps)
    t = Truncations(layer)
    if rank is not None:
        (r,) = normalize_ranks(rank, [t.full])
    else:
        r = choose_rank(t.s, None, (eps or 0.0) * np.linalg.norm(t.s), None)
    return t.at(r)
