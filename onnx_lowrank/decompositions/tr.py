"""RSDTR's RSDTR: tensor ring of a 2-D conv kernel by TR-SVD at a prescribed relative error, keeping,
among the 4 circular permutations of (T, C, D1, D2) and every divisor R1 of the first unfolding's
rank, the ring with the fewest parameters (Mickelin & Karaman's reduced-storage TR-SVD).

A circular shift keeps the ring order T -> C -> D1 -> D2 -> T (RSDTR Theorem 1), so every
permutation gives the same four cores G_T (d, T, a), G_C (a, C, b), G_D1 (b, D1, c),
G_D2 (c, D2, d); only which bond TR-SVD splits by the divisor differs. One chain serves them all:

    1x1 conv C -> a*b, Reshape (N, a*b, H, W) -> (N*a, b, H, W),
    D1x1 conv b -> c (vertical geometry), 1xD2 conv c -> d (horizontal geometry),
    Reshape (N*a, d, H', W') -> (N, a*d, H', W'), 1x1 conv a*d -> T.

Folding the a slices into the batch shares G_D1 and G_D2 across them, so the stored parameters
are exactly RSDTR's Table 1 for the chosen permutation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import (ConvGeometry, ConvStep, Factors, FoldChannels, Layer, Step, UnfoldChannels, channel_whitener,
                   check_eps, choose_rank, conv_macs, conv_reason)

SHIFTS = 4


class TRFactors(Factors):
    """cores: G_T, G_C, G_D1, G_D2 (ring order). `shift` is k of the permutation tau_k that
    TR-SVD ran on, and `tr_ranks` are R1..R4 of that run (RSDTR's notation for tau_k)."""

    method = "tr"

    def __init__(self, layer: Layer, cores: list[np.ndarray], shift: int):
        super().__init__(layer)
        self.cores = cores
        self.shift = shift

    @property
    def bonds(self) -> tuple[int, int, int, int]:
        """(a, b, c, d): the ranks between T-C, C-D1, D1-D2 and D2-T."""
        g_t, g_c, g_d1, g_d2 = self.cores
        return g_t.shape[2], g_c.shape[2], g_d1.shape[2], g_d2.shape[2]

    @property
    def tr_ranks(self) -> tuple[int, ...]:
        """R1..R4 of the decomposition of the permuted tensor: R_j is the left rank of its j-th
        core, which is the core of original mode (j + shift) mod 4."""
        return tuple(self.cores[(j + self.shift) % SHIFTS].shape[0] for j in range(SHIFTS))

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.tr_ranks

    def reconstruct(self) -> np.ndarray:
        return np.einsum("dta,acb,bxe,eyd->tcxy", *self.cores, optimize=True)

    def chain(self) -> list[Step]:
        g = self.layer.geometry
        g_t, g_c, g_d1, g_d2 = self.cores
        a, b, c, d = self.bonds
        t, ch = g_t.shape[1], g_c.shape[1]
        point = ConvGeometry.pointwise(2)
        return [ConvStep(g_c.transpose(0, 2, 1).reshape(a * b, ch, 1, 1), point),
                FoldChannels(a),
                ConvStep(g_d1.transpose(2, 0, 1)[:, :, :, None], g.along([0])),
                ConvStep(g_d2.transpose(2, 0, 1)[:, :, None, :], g.along([1])),
                UnfoldChannels(a),
                ConvStep(g_t.transpose(1, 2, 0).reshape(t, a * d, 1, 1), point, bias=self.layer.bias)]

    @property
    def weight_params(self) -> int:
        return sum(core.size for core in self.cores)

    def weight_macs(self, in_spatial: Sequence[int]) -> int:
        g = self.layer.geometry
        a, b, c, d = self.bonds
        t, ch = self.cores[0].shape[1], self.cores[1].shape[1]
        d1, d2 = g.kernel
        mid = g.along([0]).out_size(in_spatial)
        out = g.out_size(in_spatial)
        return (conv_macs(a * b, ch, (), in_spatial) + a * conv_macs(c, b, (d1,), mid)
                + a * conv_macs(d, c, (d2,), out) + conv_macs(t, a * d, (), out))


def table1_storage(shift: int, ranks: Sequence[int], t: int, c: int, d1: int, d2: int) -> int:
    """RSDTR's Table 1 storage for tau_shift with TR ranks R1..R4 of that permutation. (The table
    prints R4*T*R4 in the tau_2 row; its cores, Appendix A, give R3*T*R4, used here.)"""
    r1, r2, r3, r4 = ranks
    return {
        0: r2 * c * r3 + r3 * d1 * r4 + r4 * d2 * r1 + r1 * t * r2,
        1: r1 * c * r2 + r2 * d1 * r3 + r3 * d2 * r4 + r4 * t * r1,
        2: r4 * c * r1 + r1 * d1 * r2 + r2 * d2 * r3 + r3 * t * r4,
        3: r3 * c * r4 + r4 * d1 * r1 + r1 * d2 * r2 + r2 * t * r3,
    }[shift]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tr_svd_runs(tensor: np.ndarray, eps: float, caps: Sequence[int] | None = None) -> list[list[np.ndarray]]:
    """Zhao et al.'s TR-SVD at relative error eps, once per divisor R1 of the first rank: the first
    unfolding is truncated at sqrt(2) * eps * ||X|| / sqrt(N), the later ones at
    eps * ||X|| / sqrt(N), so the total error is at most eps * ||X||. `caps` bound R1..RN (then
    the error may exceed eps): the first rank R1 * R2 is at most caps[0] * caps[1], and only its
    divisors within both caps are run. Cores (R_k, I_k, R_{k+1}) with R_{N+1} = R_1."""
    dims = tensor.shape
    n = len(dims)
    caps = list(caps) if caps is not None else [None] * n
    norm = np.linalg.norm(tensor)
    delta_first = np.sqrt(2.0) * eps * norm / np.sqrt(n)
    delta = eps * norm / np.sqrt(n)
    u, s, vt = np.linalg.svd(tensor.reshape(dims[0], -1), full_matrices=False)
    r = choose_rank(s, None, delta_first, None)

    def splits(r: int) -> list[int]:
        return [r1 for r1 in divisors(r) if (caps[0] is None or r1 <= caps[0])
                and (caps[1] is None or r // r1 <= caps[1])]

    if caps[0] is not None and caps[1] is not None:
        r = min(r, caps[0] * caps[1])
    while not splits(r):  # r = 1 always splits
        r -= 1
    runs = []
    for r1 in splits(r):
        r2 = r // r1
        cores = [u[:, :r].reshape(dims[0], r1, r2).transpose(1, 0, 2)]
        # the remainder (R1, R2, I2..IN) with R1 moved last: (R2, I2, ..., IN, R1)
        rest = np.moveaxis((s[:r, None] * vt[:r]).reshape((r1, r2) + dims[1:]), 0, -1)
        for k in range(1, n - 1):
            left = rest.shape[0]
            uk, sk, vtk = np.linalg.svd(rest.reshape(left * dims[k], -1), full_matrices=False)
            rk = choose_rank(sk, None, delta, None)
            if caps[k + 1] is not None:
                rk = min(rk, caps[k + 1])
            cores.append(uk[:, :rk].reshape(left, dims[k], rk))
            rest = sk[:rk, None] * vtk[:rk]
        cores.append(rest.reshape(rest.shape[0], dims[-1], r1))
        runs.append(cores)
    return runs


def check(layer: Layer, **_) -> str | None:
    return conv_reason(layer, "tr", [2])


def factorize(layer: Layer, eps: float = 0.0, rank: int | Sequence[int] | None = None) -> TRFactors:
    """The ring with the fewest parameters whose relative error is <= eps (eps=0: exact). `rank`
    caps the TR ranks R1..R4 of every permutation's run (an int caps all four: --rank R); the
    error is then what the caps leave."""
    check_eps(eps)
    caps = None if rank is None else ([int(rank)] * SHIFTS if np.isscalar(rank) else [int(r) for r in rank])
    if caps is not None and (len(caps) != SHIFTS or min(caps) < 1):
        raise ValueError(f"tr takes a rank >= 1 or {SHIFTS} of them (R1..R4); got {rank!r}")
    white = channel_whitener(layer)
    w = layer.weight.astype(np.float64)
    if white is not None:
        w = white.into(w, 1)
    best: TRFactors | None = None
    for shift in range(SHIFTS):
        axes = [(shift + j) % SHIFTS for j in range(SHIFTS)]
        for permuted_cores in tr_svd_runs(w.transpose(axes), eps, caps):
            cores = [None] * SHIFTS
            for j, core in enumerate(permuted_cores):
                cores[axes[j]] = core
            candidate = TRFactors(layer, cores, shift)
            if best is None or candidate.weight_params < best.weight_params:
                best = candidate
    if white is not None:
        best.cores[1] = white.back(best.cores[1], 1)  # G_C carries the input channels
    return best
