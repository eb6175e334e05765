"""`--select cosine`: Kokhazadeh et al.'s similarity strategy. Start every layer at rank 1 (its method's cheapest
candidate). Measure the model; while the drop exceeds eps, compare each factorized layer's output
with the original's, both fed the ORIGINAL model's input of that layer (captured patches) and
taken after the activation that follows the layer; layers whose cosine similarity is under 0.92
(0.96 inside non-sequential blocks: residual, concat) lose 5% of compression (the next step up
their ladder: 5%, 10%, ... of the layer's cost). Kokhazadeh et al. fine-tunes between rounds; we do not, so when
every layer clears its threshold and the drop still exceeds eps, the less similar half of the
layers that can still rise steps up. Every round raises at least one layer, so the loop ends.

The fine-tuning loop (`convert --finetune-epochs`) uses the same analysis the way Kokhazadeh et al. does: when
a fine-tuned model misses eps, the layers it names step up (`raise_dissimilar`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from ...graph.index import GraphIndex
from ..candidates import Candidate, LayerProblem
from ..search import Choice, Context, Search, Selection

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
    if not candidate.factored:
        return 1.0
    rows = problem.stats.sample  # (m, groups, d)
    layer = problem.target.layer
    g = layer.groups
    w = layer.weight.astype(np.float64).reshape(g, layer.out_channels // g, -1)
    w_hat = candidate.factors.reconstruct().reshape(w.shape)
    bias = 0.0 if layer.bias is None else layer.bias.astype(np.float64).reshape(g, -1)
    per_group = rows.transpose(1, 0, 2)  # (groups, m, d): one BLAS product per group, not an einsum loop
    a = act(np.matmul(per_group, w.transpose(0, 2, 1)).transpose(1, 0, 2) + bias)
    b = act(np.matmul(per_group, w_hat.transpose(0, 2, 1)).transpose(1, 0, 2) + bias)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.sum(a * b) / den) if den > 0 else 1.0


class Similarity:
    """Kokhazadeh et al.'s per-layer analysis of a model: each layer's threshold (0.96 inside non-sequential
    blocks, else 0.92) and the cosine similarity of a candidate's output with the original's
    (`similarity`), cached per candidate."""

    def __init__(self, model: onnx.ModelProto, problems: list[LayerProblem], input_names: dict[str, str]):
        index = GraphIndex(model.graph)
        self.acts = {p.name: activation(index, p.target.output) for p in problems}
        self.threshold = {p.name: THRESHOLD_NON_SEQUENTIAL if non_sequential(index, p, input_names[p.name])
                          else THRESHOLD for p in problems}
        self._cache: dict[int, float] = {}

    def __call__(self, problem: LayerProblem, candidate: Candidate) -> float:
        if id(candidate) not in self._cache:
            self._cache[id(candidate)] = similarity(problem, candidate, self.acts[problem.name])
        return self._cache[id(candidate)]

    def named(self, problems: list[LayerProblem], choice: Choice, fallback: float = 0.5) -> list[LayerProblem]:
        """The layers to raise: the factored ones under their threshold; when none is (the drop
        still exceeds eps, so some layer must give), the `fallback` share of them that is least
        similar, at least one."""
        factored = [p for p in problems if choice[p.name].factored]
        low = [p for p in factored if self(p, choice[p.name]) < self.threshold[p.name]]
        if low:
            return low
        ranked = sorted(factored, key=lambda p: self(p, choice[p.name]))
        return ranked[: max(1, int(len(ranked) * fallback))]


def step_up(problem: LayerProblem, candidate: Candidate) -> Candidate:
    """Kokhazadeh et al.'s step: 5% of the layer's cost less compression. The most accurate candidate of the same
    method costing at most 5% of the layer more (the next more accurate one when the ladder has
    nothing in that span); the original layer past the end of the ladder."""
    if not candidate.factored:
        return candidate
    fraction = candidate.cost / problem.base_cost + STEP
    if fraction >= 1:
        return problem.keep
    better = [c for c in problem.of(candidate.method) if c.error < candidate.error]
    if not better:
        return problem.keep
    within = [c for c in better if c.cost <= fraction * problem.base_cost]
    return min(within, key=lambda c: c.error) if within else min(better, key=lambda c: c.cost)


def raise_dissimilar(similar: Similarity, problems: list[LayerProblem], choice: Choice
                     ) -> tuple[Choice, list[str]]:
    """`choice` with the layers the analysis names one step up, and their names. When none is
    under its threshold, the least similar one alone: each round of the fine-tuning loop costs a
    fine-tune, and the loop keeps the best model so far, so it steps finely (measured on the digit
    CNN within eps 0.005: 5.55x fewer MACs where raising half the layers ended at 4.95x)."""
    named = similar.named(problems, choice, fallback=0)
    raised = dict(choice)
    for p in named:
        raised[p.name] = step_up(p, choice[p.name])
    return raised, [p.name for p in named]


def select(search: Search, ctx: Context) -> Selection:
    problems = search.problems
    method = {p.name: p.preferred(ctx.methods) for p in problems}
    sim = Similarity(ctx.prepared, problems, {t.name: t.activation for t in ctx.targets})
    level = {p.name: 0 for p in problems}

    def pick(p: LayerProblem) -> Candidate:
        m = method[p.name]
        if m is None:
            return p.keep
        return p.of(m)[0] if level[p.name] == 0 else p.at_fraction(m, level[p.name] * STEP)

    rounds = 0
    while True:
        choice = {p.name: pick(p) for p in problems}
        rounds += 1
        if search.within(choice, f"round {rounds}"):
            break
        low = sim.named(problems, choice)  # the factored layers are those below full cost
        if not low:
            break
        for p in low:
            level[p.name] += 1
    reasons = {}
    for p in problems:
        c = choice[p.name]
        reasons[p.name] = (f"cosine {sim(p, c):.4f} (threshold {sim.threshold[p.name]}) after "
                           f"{level[p.name]} step(s) of 5%" if c.factored else "kept: raised to full cost")
    return Selection(choice, reasons)
