import os
import sys

from hypothesis import settings

# tests in sub-folders import the shared builders in tests/helpers.py
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic property tests; no deadline, since onnxruntime session start-up time varies.
settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
