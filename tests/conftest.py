import os
import sys

import numpy as np
import pytest
from hypothesis import settings

# tests in sub-folders import the shared builders in tests/helpers.py
sys.path.insert(0, os.path.dirname(__file__))
from helpers import mnist_test_images

# Deterministic property tests; no deadline, since onnxruntime session start-up time varies.
settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """400 MNIST test images with their labels, as an .npz calibration file."""
    x, y = mnist_test_images(400)
    path = tmp_path_factory.mktemp("calib") / "mnist.npz"
    np.savez(path, image=x, labels=y)
    return path
