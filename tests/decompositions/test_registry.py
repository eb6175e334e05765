"""The registry, rank normalisation and truncation rules."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.decompositions import ConvGeometry, Layer, METHODS, decompose, reason_not_applicable
from onnx_lowrank.decompositions.base import normalize_ranks, rank_for_energy, rank_for_tail
from onnx_lowrank.errors import UnsupportedLayer

GEOM = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))


def test_registry_names_are_the_documented_methods():
    assert list(METHODS) == ["svd", "spatial-svd", "tucker2", "cp", "tucker2-cp", "tt", "tr"]


def test_unknown_method_and_option_are_clear_errors():
    layer = Layer(np.ones((4, 3)))
    with pytest.raises(ValueError, match="unknown decomposition 'pca'; choose from svd"):
        decompose(layer, "pca")
    with pytest.raises(ValueError, match="svd takes rank, eps; got ways"):
        decompose(layer, "svd", ways=4)


@pytest.mark.parametrize("name,layer,phrase", [
    ("tucker2", Layer(np.ones((4, 3))), "use svd for Gemm/MatMul"),
    ("tt", Layer(np.ones((4, 3, 3)), None, ConvGeometry((3,), (1,), (1,), (1, 1))), "needs a 2-D conv kernel"),
    ("cp", Layer(np.ones((4, 3, 1, 1)), None, ConvGeometry.pointwise(2)), "1x1 kernel"),
    ("svd", Layer(np.ones((8, 1, 3, 3)), None, GEOM, groups=8), "depthwise"),
    ("tr", Layer(np.ones((8, 2, 3, 3)), None, GEOM, groups=4), "grouped conv"),
])
def test_inapplicable_layers_get_a_reason_not_a_crash(name, layer, phrase):
    assert phrase in reason_not_applicable(layer, name)
    with pytest.raises(UnsupportedLayer, match=phrase):
        decompose(layer, name)


def test_normalize_ranks_accepts_int_fraction_tuple_full():
    assert normalize_ranks(3, [10, 20]) == (3, 3)
    assert normalize_ranks(0.25, [10, 20]) == (3, 5)
    assert normalize_ranks((4, 0.5), [10, 20]) == (4, 10)
    assert normalize_ranks("full", [10, 20]) == (10, 20)
    assert normalize_ranks(99, [10, 20]) == (10, 20)  # clipped to the full rank
    for bad, message in ((1.5, "fraction"), ((1, 2, 3), "takes 2 ranks"), ("most", "'full'"), (True, "number")):
        with pytest.raises(ValueError, match=message):
            normalize_ranks(bad, [10, 20])


def test_truncation_rules():
    s = np.array([4.0, 3.0, 0.0])
    assert rank_for_tail(s, 3.0) == 1 and rank_for_tail(s, 2.9) == 2 and rank_for_tail(s, 0.0) == 2
    assert rank_for_energy(s, 0.64) == 1 and rank_for_energy(s, 0.65) == 2


def test_eps_bounds_the_error():
    rng = np.random.default_rng(0)
    layer = Layer(rng.standard_normal((16, 12, 3, 3)), None, GEOM)
    for name in ("svd", "spatial-svd", "tucker2", "tt", "tr"):
        for eps in (0.1, 0.3, 0.6):
            assert decompose(layer, name, eps=eps).error() <= eps + 1e-12, (name, eps)


def test_grouped_eps_refactors_every_group_at_equal_ranks():
    rng = np.random.default_rng(1)
    weight = np.concatenate([rng.standard_normal((8, 1)) @ rng.standard_normal((1, 6 * 9)),  # rank 1
                             rng.standard_normal((8, 6 * 9))]).reshape(16, 6, 3, 3)        # full rank
    f = decompose(Layer(weight, None, GEOM, groups=2), "tucker2", eps=0.2)
    assert len({p.ranks for p in f.parts}) == 1
    assert all(p.error() <= 0.2 for p in f.parts)
