"""DropMeter: the early-stopping measurement the searches use agrees with quality() wherever the
drop is within eps, and when it stops early it returns a true lower bound above eps. session():
large weights reach onnxruntime as arrays, with the same results."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import init, make_model, tensor
from onnx import helper

from onnx_lowrank.calibration.data import CalibrationSet
from onnx_lowrank.graph.io import APART
from onnx_lowrank.metrics.quality import DropMeter, quality
from onnx_lowrank.runtime.sessions import predict, session


def linear_classifier(weight: np.ndarray):
    node = helper.make_node("MatMul", ["x", "W"], ["logits"])
    return make_model([node], [tensor("x", ["N", weight.shape[0]])], [tensor("logits", ["N", weight.shape[1]])],
                      [init("W", weight.astype(np.float32))])


@pytest.mark.parametrize("metric", ["accuracy", "agreement", "r2", "cosine"])
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.2, 0.6, 1.5])
@pytest.mark.parametrize("eps", [0.005, 0.05])
def test_drop_meter_matches_quality_within_eps_and_bounds_it_beyond(metric, noise, eps):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 10))
    x = rng.normal(size=(300, 20)).astype(np.float32)
    labels = (x @ w + rng.normal(scale=2.0, size=(300, 10))).argmax(1)  # the model gets some wrong
    data = CalibrationSet({"x": x}, labels)
    original, perturbed = linear_classifier(w), linear_classifier(w + noise * rng.normal(size=w.shape))
    reference = predict(original, data)
    truth = quality(metric, reference, predict(perturbed, data), labels).drop

    meter = DropMeter(metric, data, reference, eps, batch_size=7)
    got = meter(perturbed)
    if meter.exact:
        assert got == pytest.approx(truth, abs=1e-9)
    else:
        assert eps < got <= truth + 1e-9
    assert (got <= eps) == (truth <= eps)


def test_a_failing_model_stops_after_the_first_chunk():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(20, 10))
    data = CalibrationSet({"x": rng.normal(size=(1000, 20)).astype(np.float32)})
    meter = DropMeter("agreement", data, predict(linear_classifier(w), data), eps=0.01)
    calls = []
    original_take = meter.data.take
    meter.data.take = lambda idx: calls.append(len(idx)) or original_take(idx)
    drop = meter(linear_classifier(rng.normal(size=w.shape)))  # an unrelated classifier
    assert not meter.exact and drop > 0.01
    assert calls == [DropMeter.FIRST_CHUNK]


def test_an_accuracy_drop_of_exactly_eps_is_not_above_it():
    """890/900 - 872/900 is 0.020000000000000018 in floats; 18 samples lost of 900 is 0.02, which
    DropMeter (counting) and the verification (quality) must agree is within eps 0.02."""
    from onnx_lowrank.metrics.quality import quality

    n = 900
    labels = np.zeros(n, dtype=np.int64)
    reference = np.zeros((n, 3))
    reference[:, 0] = 1
    reference[:10] = [0, 0, 1]                 # the original gets 890 right
    outputs = reference.copy()
    outputs[10:28] = [0, 1, 0]                 # the compressed model 872
    q = quality("accuracy", [reference], [outputs], labels)
    assert q.drop == 0.02 and q.value == 872 / 900
    assert quality("agreement", [reference], [outputs], None).drop == 0.02


def test_a_session_takes_large_weights_as_arrays_with_the_same_outputs():
    """A 2 MB weight goes to onnxruntime as an external initializer (not through protobuf); a
    small one stays inline; the outputs are the plain session's, and the model is unchanged."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    big = rng.normal(size=(64, 8192)).astype(np.float32)
    assert big.nbytes >= APART
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 8192])],
                       [init("W", big), init("b", rng.normal(size=8192).astype(np.float32))])
    before = model.SerializeToString()
    sess = session(model)
    assert [w.shape for w in sess.weights] == [(64, 8192)]
    x = rng.normal(size=(5, 64)).astype(np.float32)
    plain = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(sess.run(None, {"x": x})[0], plain)
    assert model.SerializeToString() == before
