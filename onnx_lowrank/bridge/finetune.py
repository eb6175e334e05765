"""Fine-tuning a compressed model through PyTorch: ONNX → onnx2torch module → train → ONNX.

The student learns from the original model's outputs (distillation: KL divergence on softened
logits for a classifier, scale-free MSE for other outputs), so an exported model and unlabeled
data are enough; with labels, cross-entropy is added. Under `torchrun --nproc_per_node N` the same
call trains with DistributedDataParallel (gloo on CPU, nccl on GPU) and a DistributedSampler; every
process returns the same model, and only the caller on rank 0 should write it.

The way back is torch.onnx.export (the TorchScript exporter: the dynamo one fails on onnx2torch's
Reshape and moves weights to a side file) with the student's input/output names, its dynamic
batch axis and its opset where torch can write it; the exported file is then run in onnxruntime
against the module, and a mismatch above `PARITY` is an error, not a silent drift."""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..calibration.data import CalibrationSet, model_inputs, token_mask
from ..errors import FinetuneDiverged, OnnxLowrankError
from ..graph import find_targets, replace_layers
from ..graph.index import opset_version
from ..metrics.quality import is_classifier
from ..runtime.sessions import predict, session
from . import deps
from .convert import prepare_for_onnx2torch, to_torch, write_back

PARITY = 1e-4  # largest |exported - module| allowed on the check batch
LR_BACKOFFS = 3  # an epoch that raised the loss is run again at a tenth of the rate, this many times
LEGACY_EXPORT_MAX_OPSET = 20  # the newest opset torch's TorchScript exporter writes


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 3
    lr: float = 3e-3               # SGD with momentum 0.9
    batch_size: int = 64
    device: str = "cpu"
    temperature: float = 2.0       # of the distillation softmax (Hinton et al.)
    label_weight: float = 0.5      # with labels: this much cross-entropy, the rest distillation
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0; got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if not 0 <= self.label_weight <= 1:
            raise ValueError(f"the label weight must be in [0, 1]; got {self.label_weight}")


@dataclass
class FinetuneLog:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    processes: int = 1
    parity: float = 0.0                                 # max |exported - module| on the check batch
    start_loss: float = 0.0                             # of the student before training
    lr: float = 0.0                                     # the rate training ended at (after back-offs)
    stopped: bool = False                               # before its epochs: no rate lowered the loss


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, data: CalibrationSet,
             options: FinetuneOptions = FinetuneOptions()) -> tuple[onnx.ModelProto, FinetuneLog]:
    """`student` trained for `options.epochs` epochs on `data` (its inputs; its labels if any)
    towards `teacher`'s outputs, returned as an ONNX model with the student's interface."""
    options.validate()
    deps.require_torch()
    module = to_torch(student)
    names = [spec.name for spec in model_inputs(student)]
    log = train(module, names, data, predict(teacher, data, options.batch_size), options)
    exported = export(module, student, {n: data.inputs[n][:8] for n in names}, log)
    return exported, log


def train(module, names: list[str], data: CalibrationSet, targets: list[np.ndarray],
          options: FinetuneOptions) -> FinetuneLog:
    """Train `module` (to_torch's, taking the inputs `names` positionally) in place for
    `options.epochs` epochs towards the teacher's outputs `targets` on `data` (and its labels).
    An epoch that shows the rate too large runs again at a tenth of it (LR_BACKOFFS times at most,
    then training stops with the last good weights); the log says where it ended."""
    options.validate()
    import torch
    import torch.distributed as dist

    distributed = _init_distributed(options.device)
    log = FinetuneLog(processes=dist.get_world_size() if distributed else 1)
    torch.manual_seed(options.seed)
    classifier = is_classifier(targets)
    device = torch.device(options.device)
    module.to(device)
    model = module
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    tensors = [torch.from_numpy(np.ascontiguousarray(data.inputs[n])) for n in names]
    tensors += [torch.from_numpy(np.ascontiguousarray(t)) for t in targets]
    if data.labels is not None:
        tensors.append(torch.from_numpy(data.labels.astype(np.int64)))
    dataset = torch.utils.data.TensorDataset(*tensors)
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=options.seed) if distributed else None
    generator = torch.Generator().manual_seed(options.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, shuffle=sampler is None,
                                         sampler=sampler, generator=generator if sampler is None else None)
    # SGD, not Adam: Adam scales every step to the learning rate however small the gradient, so
    # the weights the distillation has nothing to say about (the student already agrees there)
    # take noise-sized steps of full length; the default model distilled from itself lost 0.7
    # points of accuracy in one epoch of Adam 1e-3, none with SGD
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=options.lr, momentum=0.9)
    k = len(names)
    mask_at = next((i for i, n in enumerate(names) if token_mask({n: data.inputs[n][:1]}) is not None), None)

    def run_epoch(epoch: int, learn: bool) -> float:
        """The mean loss over the data, learning from each batch (or only measuring)."""
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, seen = 0.0, 0
        for batch in loader:
            batch = [b.to(device) for b in batch]
            with torch.set_grad_enabled(learn):
                outputs = model(*batch[:k])
                outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
                if mask_at is not None:  # the teacher's token outputs are zero at padding (predict)
                    outputs = [_without_padding(o, batch[mask_at]) for o in outputs]
                labels = batch[k + len(targets)] if data.labels is not None else None
                loss = _loss(outputs, batch[k:k + len(targets)], labels, classifier, options)
            if learn:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * len(batch[0])
            seen += len(batch[0])
        return _mean_over_processes(total, seen, distributed, device)

    # the module stays in eval mode (to_torch's): BatchNorm keeps the statistics of the data the
    # original was trained on, which the few thousand samples fine-tuning gets could only make
    # worse, and Dropout stays off, so the student is trained as it will run
    lr = options.lr
    log.start_loss = previous = run_epoch(0, learn=False)
    for epoch in range(options.epochs):
        saved = copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict())
        for attempt in range(LR_BACKOFFS + 1):
            loss = run_epoch(epoch, learn=True)
            # a rate too large shows as a loss above the student's own, or doubled in one epoch
            # (not as the few percent an epoch's mean wanders once training has settled)
            if loss <= min(log.start_loss, 2 * previous):  # (NaN is not)
                break
            # the rate is too large for this model (measured on MobileNetV2's BatchNorm-folded
            # weights: at 3e-4 the loss rose epoch after epoch, at 3e-3 it went 3.2 -> 37.6): the
            # epoch again from where it started, at a tenth of the rate
            module.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            if attempt < LR_BACKOFFS:
                lr /= 10
                for group in optimizer.param_groups:
                    group["lr"] = lr
        else:  # no rate tried lowered the loss: the weights stay as the last good epoch left them
            log.stopped = True
            break
        log.losses.append(loss)
        previous = loss
    log.lr = lr
    return log


def finetune_iteratively(model: onnx.ModelProto, teacher: onnx.ModelProto, layers: list[tuple[str, Callable]],
                         data: CalibrationSet, options: FinetuneOptions = FinetuneOptions(),
                         after_step: Callable[[str, onnx.ModelProto], None] = lambda name, model: None
                         ) -> tuple[onnx.ModelProto, FinetuneLog]:
    """Yang & Liu's iterative compress-and-fine-tune: the layers of `model` named in `layers`, in that
    order, replaced one at a time, each by the factors its function makes of the layer as trained
    so far (a decompositions.Layer in, Factors out), and the whole model fine-tuned for
    `options.epochs` epochs after each replacement. The trained weights go back into the graph
    between steps (convert.write_back), so the next layer is factored from them; `after_step`
    sees each step's model. Returns the last, exported like `finetune`'s, and every epoch's loss."""
    options.validate()
    deps.require_torch()
    names = [spec.name for spec in model_inputs(model)]
    targets = predict(teacher, data, options.batch_size)
    work = prepare_for_onnx2torch(model)  # in onnx2torch's form throughout, so weights map back
    log, module = FinetuneLog(lr=options.lr), None
    for name, factor in layers:
        found = {t.name: t for t in find_targets(work)[0]}
        if name not in found:
            raise OnnxLowrankError(f"{name}: the layer is no longer a target after the steps before it")
        work = replace_layers(work, [(found[name], factor(found[name].layer))]).model
        module = to_torch(work)
        step = train(module, names, data, targets, options)
        # each step starts again at options.lr; the log keeps the lowest rate any step ended at
        log.losses += step.losses
        log.lr, log.stopped = min(log.lr, step.lr), log.stopped or step.stopped
        log.processes = step.processes
        work = write_back(module, work)
        after_step(name, work)
    if module is None:  # no layer to replace: the model as it is
        module = to_torch(work)
    exported = export(module, model, {n: data.inputs[n][:8] for n in names}, log)
    return exported, log


def process_rank() -> int:
    """This process's rank in a torchrun job (0 when there is none): only rank 0 writes."""
    return int(os.environ.get("RANK", "0"))


def same_as_rank0(value: bool) -> bool:
    """`value` as rank 0 of a torchrun job has it (this process's own when there is no job)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _init_distributed(device: str) -> bool:
    """Join the process group torchrun set up (its environment variables), if there is one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_world_size() > 1


def _mean_over_processes(total: float, seen: int, distributed: bool, device) -> float:
    if distributed:
        import torch
        import torch.distributed as dist

        # on the training device: nccl reduces only CUDA tensors
        both = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, seen = float(both[0]), int(both[1])
    return total / max(seen, 1)


def _without_padding(output, mask):
    """calibration.data.without_padding in torch: zero where the attention mask is 0."""
    if output.dim() < 3 or tuple(output.shape[:2]) != tuple(mask.shape):
        return output
    return output * (mask != 0).to(output.dtype).reshape(tuple(mask.shape) + (1,) * (output.dim() - 2))


def _loss(outputs, teacher, labels, classifier: bool, options: FinetuneOptions):
    """Distillation from the teacher's outputs; with labels, mixed with cross-entropy."""
    import torch.nn.functional as F

    if classifier:
        t = options.temperature
        loss = F.kl_div(F.log_softmax(outputs[0] / t, dim=1), F.log_softmax(teacher[0] / t, dim=1),
                        log_target=True, reduction="batchmean") * t * t
        if labels is not None:
            w = options.label_weight
            loss = (1 - w) * loss + w * F.cross_entropy(outputs[0], labels)
        return loss
    # MSE relative to the teacher's own scale, so outputs of any size weigh alike
    return sum(F.mse_loss(s.float(), r.float()) / (r.float().pow(2).mean() + 1e-12) for s, r in zip(outputs, teacher))


def export(module, like: onnx.ModelProto, sample: dict[str, np.ndarray], log: FinetuneLog | None = None) -> onnx.ModelProto:
    """`module` as ONNX with `like`'s input/output names, its symbolic (dynamic) axes and its opset
    (capped at what the exporter writes), checked against the module in onnxruntime on `sample`."""
    import torch

    inputs = [i for i in like.graph.input if i.name in sample]
    names_in = [i.name for i in inputs]
    names_out = [o.name for o in like.graph.output]
    dynamic = {}
    for value in list(inputs) + list(like.graph.output):
        axes = {i: d.dim_param or f"{value.name}_dim{i}" for i, d in enumerate(value.type.tensor_type.shape.dim)
                if not d.HasField("dim_value")}
        if axes:
            dynamic[value.name] = axes
    opset = opset_version(like) or 17
    device = next(module.parameters()).device
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n])).to(device) for n in names_in)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes
        torch.onnx.export(module, args, buffer, input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic, opset_version=min(max(opset, 9), LEGACY_EXPORT_MAX_OPSET),
                          do_constant_folding=True, dynamo=False)
    exported = onnx.load_from_string(buffer.getvalue())
    with torch.no_grad():
        expected = module(*args)
    expected = [e.cpu().numpy() for e in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    if not all(np.all(np.isfinite(e)) for e in expected if np.issubdtype(e.dtype, np.floating)):
        raise FinetuneDiverged("fine-tuning diverged: the module outputs NaN or Inf; try a smaller --lr")
    got = session(exported).run(names_out, {n: sample[n] for n in names_in})
    parity = max(float(np.max(np.abs(g.astype(np.float64) - e))) for g, e in zip(got, expected))
    if not parity <= PARITY:
        raise OnnxLowrankError(f"the exported ONNX differs from the fine-tuned module by {parity:.2e} "
                               f"(allowed {PARITY:g}): not written")
    if log is not None:
        log.parity = parity
    return exported
