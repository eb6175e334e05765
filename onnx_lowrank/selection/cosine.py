"""`--select cosine`: 004's similarity strategy. Start every layer at rank 1 (its method's cheapest
candidate). Measure the model; while the drop exceeds eps, compare each factorized layer's output
with the original's, both fed the ORIGINAL model's input of that layer (captured patches) and
taken after the activation that follows the layer; layers whose cosine similarity is under 0.92
(0.96 inside non-sequential blocks: residual, concat) lose 5% of compression (the next step up
their ladder: 5%, 10%, ... of the layer's cost). 004 fine-tunes between rounds; we do not, so when
every layer clears its threshold and the drop still exceeds eps, the less similar half of the
layers that can still rise steps up. Every round raises at least one layer, so the loop ends.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from ..graph.index import GraphIndex
from .candidates import Candidate, LayerProblem
from .search import Choice, Search

STEP = 0.05
THRESHOLD, THRESHOLD_NON_SEQUENTIAL = 0.92, 0.96
MERGES = {"Add", "Sum", "Concat", "Mul", "Sub"}
PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Elu", "Selu",
                "Gelu", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization", "Identity",
                "Dropout", "Flatten", "Reshape", "Transpose"}


def activation(index: GraphIndex, output: str) -> Callable[[np.ndarray], np.ndarray]:
    """The element-wise activation applied to a layer's output, if its only reader is one."""
    users = index.consumers.get(output, [])
    if len(users) != 1:
        return lambda y: y
    node = users[0]
    op = node.op_type
    if op == "Relu":
        return lambda y: np.maximum(y, 0)
    if op == "Clip":
        lo = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        attrs = {a.name: a.f for a in node.attribute}
        lo = attrs.get("min", -np.inf) if lo is None else float(lo)
        hi = attrs.get("max", np.inf) if hi is None else float(hi)
        return lambda y: np.clip(y, lo, hi)
    if op == "LeakyRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
        return lambda y: np.where(y > 0, y, alpha * y)
    if op == "Sigmoid":
        return lambda y: 1 / (1 + np.exp(-y))
    if op == "Tanh":
        return np.tanh
    if op == "HardSwish":
        return lambda y: y * np.clip(y / 6 + 0.5, 0, 1)
    return lambda y: y


def non_sequential(index: GraphIndex, problem: LayerProblem, input_name: str) -> bool:
    """Inside a residual/concat block: the layer's input also feeds another node (a fork), or its
    output reaches a merge of computed tensors before the next layer."""
    if len(index.consumers.get(input_name, [])) > 1:
        return True
    frontier, seen = [problem.target.output], set()
    while frontier:
        name = frontier.pop()
        for node in index.consumers.get(name, []):
            key = node.name or node.output[0]
            if key in seen:
                continue
            seen.add(key)
            if node.op_type in MERGES and sum(not index.is_constant(i) for i in node.input if i) > 1:
                return True
            if node.op_type in PASS_THROUGH:
                frontier.extend(node.output)
    return False


def similarity(problem: LayerProblem, candidate: Candidate, act: Callable) -> float:
    """Cosine of the layer's outputs after its activation, original vs factored, on the sampled
    original inputs (all sampled positions together)."""
    if candidate.factors is None:
        return 1.0
    rows = problem.stats.sample  # (m, groups, d)
    layer = problem.target.layer
    g = layer.groups
    w = layer.weight.astype(np.float64).reshape(g, layer.out_channels // g, -1)
    w_hat = candidate.factors.reconstruct().reshape(w.shape)
    bias = 0.0 if layer.bias is None else layer.bias.astype(np.float64).reshape(g, -1)
    a = act(np.einsum("mgd,gtd->mgt", rows, w) + bias)
    b = act(np.einsum("mgd,gtd->mgt", rows, w_hat) + bias)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.sum(a * b) / den) if den > 0 else 1.0


def select(search: Search, model: onnx.ModelProto, methods: tuple[str, ...] | None,
           input_names: dict[str, str]) -> tuple[Choice, dict[str, str]]:
    index = GraphIndex(model.graph)
    problems = search.problems
    method = {p.name: p.preferred(methods) for p in problems}
    acts = {p.name: activation(index, p.target.output) for p in problems}
    threshold = {p.name: THRESHOLD_NON_SEQUENTIAL if non_sequential(index, p, input_names[p.name]) else THRESHOLD
                 for p in problems}
    steps = int(round(1 / STEP))
    level = {p.name: 0 for p in problems}

    def pick(p: LayerProblem) -> Candidate:
        m = method[p.name]
        if m is None:
            return p.keep
        return p.of(m)[0] if level[p.name] == 0 else p.at_fraction(m, level[p.name] * STEP)

    cache: dict[int, float] = {}

    def sim(p: LayerProblem, c: Candidate) -> float:
        if id(c) not in cache:
            cache[id(c)] = similarity(p, c, acts[p.name])
        return cache[id(c)]

    rounds = 0
    while True:
        choice = {p.name: pick(p) for p in problems}
        rounds += 1
        if search.within(choice, f"round {rounds}"):
            break
        sims = {p.name: sim(p, choice[p.name]) for p in problems}
        movable = [p for p in problems if level[p.name] < steps and method[p.name] is not None]
        if not movable:
            break
        low = [p for p in movable if sims[p.name] < threshold[p.name]]
        if not low:
            ranked = sorted(movable, key=lambda p: sims[p.name])
            low = ranked[: max(1, len(ranked) // 2)]
        for p in low:
            level[p.name] += 1
    reasons = {}
    for p in problems:
        c = choice[p.name]
        reasons[p.name] = (f"cosine {sim(p, c):.4f} (threshold {threshold[p.name]}) after "
                           f"{level[p.name]} step(s) of 5%" if c.factors is not None else "kept: raised to full cost")
    return choice, reasons
