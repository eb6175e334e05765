"""Yang & Liu's layer sensitivity: the trace of the Hessian of the loss with respect to a layer's weight,
estimated by Hutchinson's method (Avron & Toledo): for Rademacher vectors v (entries ±1),
E[vᵀHv] = tr(H). Hv comes from double backprop, so H itself is never formed."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxLowrankError
from . import deps
from .convert import layer_weights, to_torch


def hessian_traces(model: onnx.ModelProto, node_names: list[str], inputs: dict[str, np.ndarray],
                   labels: np.ndarray | None = None, probes: int = 16, batch_size: int = 64,
                   seed: int = 0, average: bool = False, joint: bool = True) -> dict[str, float]:
    """tr(H) for each named Conv/Gemm/MatMul node (a node without a name is
    f"{op_type}:{output_name}"), H the Hessian of the loss with respect to that node's weight
    alone (the diagonal block of the full Hessian), the loss averaged over all samples of
    `inputs` (dict of graph input name → array, samples along the first axis).

    The loss is on the model's first output: cross-entropy with `labels` when given; without
    labels, cross-entropy against the model's own top-1 class for a (N, classes) output, and MSE
    against its own output otherwise (its gradient is zero, its Hessian the Gauss-Newton matrix
    2/numel·JᵀJ, which still measures how much the output moves).

    Each batch of `batch_size` samples contributes `probes` fresh Rademacher vectors per layer,
    weighted by its share of the samples. The estimate's standard deviation is
    sqrt(2·Σ_{a≠b} H_ab² / probes) for one batch: the diagonal of H is counted exactly, only its
    off-diagonal part adds noise.

    joint=True (the default) draws one Rademacher vector over all the layers' weights at once and
    reads every layer's vᵀ(Hv) off one Hessian-vector product: the cross-layer blocks of H add
    zero-mean noise, Σ_{a in the layer, b outside} H_ab² more variance per probe, but the cost no
    longer grows with the number of layers (on MobileNetV2's 53 layers, 53 times fewer passes).
    joint=False probes each layer alone, with the variance above.

    average=True divides each trace by the weight's number of elements (HAWQ-V2's average trace),
    which compares layers of different sizes; Yang & Liu ranks layers by the plain trace."""
    deps.require_torch()
    import torch
    import torch.nn.functional as F

    feeds, count = _feeds(model, inputs)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[:1] != (count,):
            raise OnnxLowrankError(f"labels: {labels.shape[0] if labels.ndim else 0} of them for {count} samples")
    if probes < 1 or batch_size < 1:
        raise OnnxLowrankError("probes and batch_size must be at least 1")

    module = to_torch(model)
    weights = layer_weights(module, model, node_names)
    module.requires_grad_(False)  # only the probed weights need gradients
    params = [w.parameter for w in weights.values()]
    for p in params:
        p.requires_grad_(True)

    generator = torch.Generator().manual_seed(seed)
    totals = np.zeros(len(params))
    for start in range(0, count, batch_size):
        batch = [torch.from_numpy(x[start:start + batch_size]) for x in feeds]
        out = module(*batch)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if labels is not None:
            loss = F.cross_entropy(out, torch.from_numpy(labels[start:start + batch_size].astype(np.int64)))
        elif out.dim() == 2:
            loss = F.cross_entropy(out, out.detach().argmax(dim=1))
        else:
            loss = F.mse_loss(out, out.detach())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        share = len(batch[0]) / count
        # a weight the loss is linear in has H = 0 and a gradient without a graph: skip it
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if joint and live:
            for _ in range(probes):
                vs = [torch.randint(0, 2, params[i].shape, generator=generator).to(params[i].dtype) * 2 - 1
                      for i in live]
                hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], grad_outputs=vs,
                                          retain_graph=True, allow_unused=True)
                for i, v, hv in zip(live, vs, hvs):
                    if hv is not None:
                        totals[i] += share * float((hv * v).sum()) / probes
            continue
        for i, (p, g) in enumerate(zip(params, grads)):
            if not g.requires_grad:
                continue  # the loss is linear in this weight: H = 0
            for _ in range(probes):
                v = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True, allow_unused=True)
                if hv is not None:
                    totals[i] += share * float((hv * v).sum()) / probes

    result = {}
    for (name, w), total in zip(weights.items(), totals):
        trace = total * w.scale ** 2  # H with respect to the ONNX weight, not nn.Linear's alpha·Bᵀ
        result[name] = float(trace / w.parameter.numel() if average else trace)
    return result


def _feeds(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
    """The arrays in the order of the graph inputs (the torch module takes them positionally),
    cast to the input's dtype, and the number of samples."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise OnnxLowrankError(f"inputs: missing {missing}, not inputs of the model {extra}")
    feeds = []
    for i in graph_inputs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds.append(np.ascontiguousarray(inputs[i.name], dtype=dtype))
    counts = {len(x) if x.ndim else 0 for x in feeds}
    if len(counts) != 1 or 0 in counts:
        raise OnnxLowrankError(f"inputs: every input needs the same number of samples (> 0) along "
                               f"its first axis, got {sorted(counts)}")
    return feeds, counts.pop()
