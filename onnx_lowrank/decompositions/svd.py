"""Truncated SVD of the weight matrix: one layer becomes two thinner ones (Kokhazadeh et al. for FC and 1x1
convs, Phan et al.'s SVD block). On a conv the first factor keeps the whole kernel and the geometry
(C -> r, DxD) and the second is a 1x1 (r -> T), which is AIMET's "weight SVD"."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvGeometry, ConvStep, DenseStep, Factors, Layer, RankSpec, Step, Whitener, check_eps, choose_rank,
                   conv_macs, normalize_ranks, relative_errors, thin_svd)


class SVDFactors(Factors):
    method = "svd"

    def __init__(self, layer: Layer, first: np.ndarray, second: np.ndarray):
        super().__init__(layer)
        self.first = first    # (r, in, *kernel)
        self.second = second  # (out, r)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.second.shape[1],)

    def reconstruct(self) -> np.ndarray:
        r = self.ranks[0]
        return (self.second @ self.first.reshape(r, -1)).reshape(self.layer.weight.shape)

    def chain(self) -> list[Step]:
        layer = self.layer
        if not layer.is_conv:
            return [DenseStep(self.first), DenseStep(self.second, layer.bias)]
        ndim = layer.geometry.ndim
        second = self.second.reshape(self.second.shape + (1,) * ndim)
        return [ConvStep(self.first, layer.geometry),
                ConvStep(second, ConvGeometry.pointwise(ndim), bias=layer.bias)]

    @property
    def weight_params(self) -> int:
        return self.first.size + self.second.size

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        r = self.ranks[0]
        if not self.layer.is_conv:
            return in_spatial[0] * (self.first.size + self.second.size)
        out = self.layer.geometry.out_size(in_spatial)
        return (conv_macs(r, self.layer.in_per_group, self.layer.kernel, out)
                + conv_macs(self.layer.out_channels, r, (), out))


def check(layer: Layer) -> str | None:
    return None


class Truncations:
    """One SVD of a layer (whitened when data-aware), truncated at any rank without redoing it."""

    def __init__(self, layer: Layer, white: Whitener | None = None):
        """`white`: the Whitener of `layer.input_cov` when the caller has made it already."""
        self.layer = layer
        matrix = layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64)
        # the whitener is not kept: mapped back once below, the factors need nothing more of it
        # (a 4608-wide conv's is 170 MB, as large as its moment)
        if layer.input_cov is not None:
            white = white or Whitener(layer.input_cov)
            matrix = white.into(matrix, 1)
        self.whitened = layer.input_cov is not None
        u, self.s, vt = thin_svd(matrix)
        del matrix
        # kept in the weight's precision, which the factors are written in (a float32 4096 x 25088
        # layer's are 400 MB so, not 800); mapped back once: truncation and L^-1 act on different
        # sides, so they commute
        precision = np.promote_types(layer.weight.dtype, np.float32)
        self.u = u.astype(precision)
        self.first_rows = (white.back(vt, 1) if self.whitened else vt).astype(precision)
        self.vt = None if self.whitened else vt  # only the unwhitened errors read it

    @property
    def full(self) -> int:
        return len(self.s)

    def tail_error(self, r: int) -> float:
        """The relative error at rank r: of the outputs on the layer's inputs when data-aware,
        of the weight otherwise (Eckart-Young, in the whitened space)."""
        total = float(np.sum(self.s ** 2))
        return float(np.sqrt(np.sum(self.s[r:] ** 2) / total)) if total > 0 else 0.0

    def output_errors(self, ranks: Sequence[int], root: np.ndarray, product: np.ndarray) -> list[float]:
        """Relative output errors ||(W - W_r) R|| / ||W R|| at each rank, R a root of the input
        second moment ((d,): a diagonal one) and `product` W R (float32). Whitened by that moment, the tail of the
        singular values is the error itself; else W - W_r = U_>r S_>r V_>r^T and U's columns are
        orthonormal, so the error is the tail of the row norms of S V^T R: one product in all."""
        if self.whitened:
            return [self.tail_error(r) for r in ranks]
        scaled = (self.s[:, None] * self.vt).astype(np.float32)
        rows = np.sum(np.square(scaled * root if root.ndim == 1 else scaled @ root), axis=1, dtype=np.float64)
        tail = np.append(np.cumsum(rows[::-1])[::-1], 0.0)
        return relative_errors(dict(enumerate(tail)), product, ranks)

    def at(self, r: int) -> SVDFactors:
        root = np.sqrt(self.s[:r])  # split the singular values evenly so neither factor dominates
        first = root[:, None] * self.first_rows[:r]
        w = self.layer.weight
        return SVDFactors(self.layer, first.reshape((r,) + w.shape[1:]), self.u[:, :r] * root)


def factorize(layer: Layer, rank: RankSpec | None = None, eps: float | None = None) -> SVDFactors:
    """Best rank-r approximation of the (out, in*kernel) matrix; with `eps`, the smallest rank
    whose relative error is <= eps. Data-aware (layer.input_cov) the error is that of the outputs
    and the truncation is optimal for it."""
    check_eps(eps)
    t = Truncations(layer)
    if rank is not None:
        (r,) = normalize_ranks(rank, [t.full])
    else:
        r = choose_rank(t.s, None, (eps or 0.0) * np.linalg.norm(t.s), None)
    return t.at(r)
