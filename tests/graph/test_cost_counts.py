"""Must-show 3: the parameter and MAC counts a factors object reports (by formula) equal a count
over the nodes of the rewritten graph."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, init, make_model, tensor
from onnx import helper

from onnx_lowrank.decompositions import decompose, reason_not_applicable
from onnx_lowrank.graph import find_targets, node_costs, prepare, replace_layers
from onnx_lowrank.graph.rewrite import chain_prefix

CONV_CASES = {
    "plain": dict(shape=(16, 12, 3, 3), input=(1, 12, 14, 14), attrs=dict(pads=[1, 1, 1, 1])),
    "strided-asym": dict(shape=(16, 12, 3, 5), input=(1, 12, 15, 13),
                         attrs=dict(strides=[2, 1], pads=[0, 2, 1, 1], dilations=[1, 2])),
    "grouped": dict(shape=(16, 6, 3, 3), input=(1, 12, 10, 10), attrs=dict(group=2, pads=[1, 1, 1, 1])),
    "conv1d": dict(shape=(16, 12, 5), input=(1, 12, 20), attrs=dict(strides=[2], pads=[2, 1])),
    "conv3d": dict(shape=(8, 6, 3, 3, 3), input=(1, 6, 6, 7, 8), attrs=dict(pads=[1, 0, 1, 1, 0, 1])),
}

METHOD_OPTIONS = {
    "svd": {"rank": 5},
    "spatial-svd": {"rank": 5},
    "tucker2": {"rank": (5, 6)},
    "cp": {"rank": 7},
    "cp4": {"rank": 7, "ways": 4},
    "tucker2-cp": {"rank": (5, 6, 4)},
    "tucker2-cp-unmerged": {"rank": (3, 3, 8)},
    "tt": {"eps": 0.3},
    "tr": {"eps": 0.3},
}


def chain_costs(model, target, factors):
    out = replace_layers(model, [(target, factors)]).model
    prefix = chain_prefix(target) + "/"
    costs = [c for c in node_costs(out) if c.name.startswith(prefix)]
    assert costs, "the chain's nodes carry the derived names"
    return sum(c.params for c in costs), sum(c.macs for c in costs)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("key", list(METHOD_OPTIONS))
def test_conv_counts_match_graph(case, key):
    spec = CONV_CASES[case]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(spec["shape"]).astype(np.float32)
    model = prepare(conv_model(weight, rng.standard_normal(spec["shape"][0]).astype(np.float32),
                               input_shape=spec["input"], **spec["attrs"]))
    (target,), _ = find_targets(model)
    original = [c for c in node_costs(model) if c.op_type == "Conv"][0]
    assert (target.layer.params, target.macs()) == (original.params, original.macs)

    method = {"cp4": "cp", "tucker2-cp-unmerged": "tucker2-cp"}.get(key, key)
    if reason_not_applicable(target.layer, method, **METHOD_OPTIONS[key]):
        return  # declines are covered by the exactness matrix
    factors = decompose(target.layer, method, **METHOD_OPTIONS[key])
    assert chain_costs(model, target, factors) == (factors.params, factors.macs(target.in_spatial))


def test_unmerged_tucker2_cp_case_really_is_unmerged():
    rng = np.random.default_rng(0)
    model = prepare(conv_model(rng.standard_normal((16, 12, 3, 3)).astype(np.float32), input_shape=(1, 12, 8, 8)))
    (target,), _ = find_targets(model)
    f = decompose(target.layer, "tucker2-cp", rank=(3, 3, 8))
    assert not f.merge_in and not f.merge_out and len(f.chain()) == 5


@pytest.mark.parametrize("form", ["gemm", "gemm-transA", "matmul-3d", "matmul-left", "keras-dense"])
def test_dense_counts_match_graph(form):
    rng = np.random.default_rng(1)
    k, n = 24, 20
    if form.startswith("gemm"):
        trans_a = int(form == "gemm-transA")
        node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", transA=trans_a, transB=1, alpha=2.0)
        inits = [init("B", rng.standard_normal((n, k)).astype(np.float32)),
                 init("C", rng.standard_normal(n).astype(np.float32))]
        model = make_model([node], [tensor("x", [k, 1] if trans_a else [1, k])], [tensor("y", None)], inits)
    elif form == "matmul-left":
        node = helper.make_node("MatMul", ["W", "x"], ["y"], name="fc")
        model = make_model([node], [tensor("x", [1, k, 7])], [tensor("y", None)],
                           [init("W", rng.standard_normal((n, k)).astype(np.float32))])
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc")]
        inits = [init("W", rng.standard_normal((k, n)).astype(np.float32))]
        if form == "keras-dense":
            nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="fc_bias"))
            inits.append(init("b", rng.standard_normal(n).astype(np.float32)))
        else:
            nodes[0].output[0] = "y"
        model = make_model(nodes, [tensor("x", [1, 9, k])], [tensor("y", None)], inits)
    model = prepare(model)
    (target,), _ = find_targets(model)
    original = sum(c.macs for c in node_costs(model))
    assert target.macs() == original
    factors = decompose(target.layer, "svd", rank=6)
    assert chain_costs(model, target, factors) == (factors.params, factors.macs(target.in_spatial))
