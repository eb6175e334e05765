"""MNIST test accuracy of ONNX models taking the default model's input, measured in onnxruntime
on models/mnist_test.npz (the 10,000 test images and their labels).

    .venv/bin/python models/mnist_accuracy.py models/mnist_cnn.onnx out/mnist_cnn_lowrank.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

TEST = Path(__file__).with_name("mnist_test.npz")


def accuracy(path: str, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predictions = np.concatenate([session.run(None, {name: images[i:i + 1000]})[0].argmax(1)
                                  for i in range(0, len(images), 1000)])
    return float(np.mean(predictions == labels))


def main() -> None:
    with np.load(TEST) as data:
        images, labels = data["image"], data["labels"]
    for path in sys.argv[1:]:
        print(f"MNIST test accuracy {accuracy(path, images, labels):.4f}  {path}")


if __name__ == "__main__":
    main()
