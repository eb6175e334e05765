"""Real ONNX files from other projects (models/corpus.py: paddle2onnx OCR and orientation models,
tf2onnx's magika and basic-pitch, six exports of silero-vad by PyTorch and spox) convert with the
default options at eps 0.01 on real inputs of their own domain; the written file runs in
onnxruntime on inputs the conversion never saw, with the interface and the input file unchanged.
The wheels and the data are fetched and built once into the cache (`make test` does it first);
the OCR detector, the slow one, is in benchmarks/zoo.py only."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import onnx
import pytest

from helpers import MODELS
from onnx_lowrank.calibration.data import load_calibration
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.metrics.quality import quality
from onnx_lowrank.pipeline import compress_file
from onnx_lowrank.runtime.sessions import predict

sys.path.insert(0, str(MODELS))
import corpus  # noqa: E402
import corpus_data  # noqa: E402

EPS = 0.01
SLOW = ("ocr_det", "ocr_rec", "basic_pitch")  # a minute or more each: make test-slow
KEYS = [pytest.param(key, marks=pytest.mark.slow) if key in SLOW else key for key in corpus.MODELS]


@pytest.mark.parametrize("key", KEYS)
def test_real_model_converts_within_eps(key, tmp_path):
    src = corpus.fetch([key])[key]
    calib, unseen, _ = corpus_data.data(key)
    calib_path, unseen_path = tmp_path / "calib.npz", tmp_path / "unseen.npz"
    np.savez(calib_path, **calib, groups=corpus_data.groups(key))  # each sample's photo, file or sentence
    np.savez(unseen_path, **unseen)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "out.onnx"
    report = compress_file(src, dst, CompressConfig(eps=EPS), calibration=str(calib_path), groups="groups")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert report.bound <= EPS and report.macs_after <= report.macs_before and report.groups is not None
    original, written = onnx.load(str(src)), onnx.load(str(dst))
    onnx.checker.check_model(written)
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input
                                                     if i.name not in {t.name for t in original.graph.initializer}]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    data = load_calibration(str(unseen_path), original)
    ref, out = predict(original, data), predict(written, data)
    assert all(np.all(np.isfinite(o)) for o in out)
    # the unseen drop is measured (benchmarks/zoo.py tabulates it); here it must be a number the
    # metric can give, and the written model must not be a different model altogether
    assert 0.0 <= quality(report.metric, ref, out, None).drop < 0.5
