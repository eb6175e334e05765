"""The decomposition methods, by name. The names are also the CLI's `--methods` choices.

`decompose(layer, name, **options)` is the one entry point: it asks the method whether the layer
suits it (an `UnsupportedLayer` with the reason if not), and factors grouped convs group by group
at equal ranks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedLayer
from . import cp, spatial_svd, svd, tr, tt, tucker2, tucker2_cp
from .base import ConvGeometry, Factors, GroupedFactors, Layer

__all__ = ["METHODS", "Method", "decompose", "reason_not_applicable", "Layer", "ConvGeometry", "Factors"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    check: Callable[..., str | None]
    factorize: Callable[..., Factors]
    per_group: bool = True  # can a grouped conv be factored group by group (chain of convs only)

    def options(self) -> list[str]:
        return [p for p in inspect.signature(self.factorize).parameters if p != "layer"]


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    if method.name in METHODS:
        raise ValueError(f"decomposition {method.name!r} is registered twice")
    METHODS[method.name] = method


register(Method("svd", "W ~ U V: two thinner Gemm/MatMul/Conv (any conv: kernel conv C->r, then 1x1 r->T)",
                svd.check, svd.factorize))
register(Method("spatial-svd", "2-D conv: Dx1 conv C->r then 1xD conv r->T",
                spatial_svd.check, spatial_svd.factorize))
register(Method("tucker2", "conv: 1x1 C->R1, core conv R1->R2, 1x1 R2->T (HOSVD/HOOI, or Phan et al.'s smallest under eps)",
                tucker2.check, tucker2.factorize))
register(Method("cp", "conv: 1x1 C->R, depthwise, 1x1 R->T (ALS + Phan et al.'s EPC); ways=4 splits the depthwise conv",
                cp.check, cp.factorize))
register(Method("tucker2-cp", "conv: Tucker-2 then CP of its core (Phan et al.'s TKD-CPD)",
                tucker2_cp.check, tucker2_cp.factorize))
register(Method("tt", "2-D conv: TT of the permuted kernel, 1x1, Dx1, 1xD, 1x1 (TTPWT)",
                tt.check, tt.factorize))
register(Method("tr", "2-D conv: tensor ring, fewest parameters over permutations and divisors (RSDTR)",
                tr.check, tr.factorize, per_group=False))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown decomposition {name!r}; choose from {', '.join(METHODS)}") from None


def _check_options(method: Method, layer: Layer, options: dict) -> dict:
    params = inspect.signature(method.check).parameters
    return {k: v for k, v in options.items() if k in params}


def reason_not_applicable(layer: Layer, name: str, **options) -> str | None:
    """Why method `name` cannot factor `layer`, or None when it can."""
    method = get_method(name)
    if layer.is_conv and layer.groups > 1:
        if layer.in_per_group == 1:
            return "depthwise conv: one input channel per group leaves nothing to factor"
        if not method.per_group:
            return f"grouped conv: {name} folds channels into the batch and cannot run per group"
    return method.check(layer, **_check_options(method, layer, options))


def decompose(layer: Layer, name: str, **options) -> Factors:
    """Factor `layer` with method `name`; `options` are the method's factorize arguments
    (rank, eps, ...). Raises UnsupportedLayer with the reason when the method does not apply."""
    method = get_method(name)
    unknown = set(options) - set(method.options())
    if unknown:
        raise ValueError(f"{name} takes {', '.join(method.options())}; got {', '.join(sorted(unknown))}")
    reason = reason_not_applicable(layer, name, **options)
    if reason:
        raise UnsupportedLayer(f"{name}: {reason}")
    if layer.groups == 1:
        return method.factorize(layer, **options)
    parts = [method.factorize(layer.group(g), **options) for g in range(layer.groups)]
    ranks = tuple(max(r) for r in zip(*(p.ranks for p in parts)))
    if any(p.ranks != ranks for p in parts):
        # an error bound picked different ranks per group; a grouped conv needs them equal, so
        # every group is refactored at the largest (each group then meets the bound too)
        fixed = {k: v for k, v in options.items() if k not in ("eps", "energy")}
        fixed["rank"] = ranks
        parts = [method.factorize(layer.group(g), **fixed) for g in range(layer.groups)]
    return GroupedFactors(layer, parts)
