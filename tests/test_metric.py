"""What --eps bounds. The default for non-classifier outputs (r2) counts every channel on its own
scale, so a detector whose class scores were zeroed beside pixel boxes on a constant anchor grid
is a drop near 1, where the whole-tensor cosine calls it 0.99 alike; the user's own metric in
Python and on the CLI, and its failures as one line; what a count on n samples resolves."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from helpers import MODELS, make_model, mnist_test_images, run
from onnx_lowrank import CompressConfig, compress
from onnx_lowrank.cli import app
from onnx_lowrank.metrics.quality import quality, resolve_metric

sys.path.insert(0, str(MODELS))
import corpus  # noqa: E402
import corpus_data  # noqa: E402
from corpus_tasks import note_frames_drop  # noqa: E402

ANCHORS, CLASSES, FEATURES = 64, 20, 24


def detector(seed: int = 0, class_scale: float = 1.0) -> onnx.ModelProto:
    """One output (samples, 4 + CLASSES, ANCHORS), as YOLO-type heads write it: 4 rows of box
    coordinates in pixels (learned offsets of a few pixels on a constant anchor grid up to 640),
    then the class scores, sigmoids near 0.05. `class_scale` 0 zeroes the class branch."""
    rng = np.random.default_rng(seed)
    grid = np.zeros((1, 4, ANCHORS), np.float32)  # cx along the image, cy, w, h: input-independent
    grid[0, 0], grid[0, 1], grid[0, 2:] = np.linspace(0, 640, ANCHORS), 320, 32
    inits = [
        numpy_helper.from_array((rng.standard_normal((FEATURES, 4 * ANCHORS)) * 2).astype(np.float32), "w_box"),
        numpy_helper.from_array(grid, "grid"),
        numpy_helper.from_array(np.array([-1, 4, ANCHORS], np.int64), "box_shape"),
        numpy_helper.from_array((rng.standard_normal((FEATURES, CLASSES * ANCHORS)) * 0.3).astype(np.float32), "w_cls"),
        numpy_helper.from_array(np.full(CLASSES * ANCHORS, -3.0, np.float32), "b_cls"),
        numpy_helper.from_array(np.array([-1, CLASSES, ANCHORS], np.int64), "cls_shape"),
        numpy_helper.from_array(np.array(class_scale, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_box"], ["box_flat"]),
        helper.make_node("Reshape", ["box_flat", "box_shape"], ["offsets"]),
        helper.make_node("Add", ["offsets", "grid"], ["boxes"]),
        helper.make_node("Gemm", ["x", "w_cls", "b_cls"], ["cls_flat"]),
        helper.make_node("Reshape", ["cls_flat", "cls_shape"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("Mul", ["probs", "scale"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["out"], axis=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4 + CLASSES, ANCHORS])], inits)


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURES)).astype(np.float32)


def test_zeroed_class_scores_are_a_drop_near_1_under_r2_not_under_cosine():
    x = features(200, 1)
    (ref,), (zeroed,) = run(detector(), {"x": x}), run(detector(class_scale=0.0), {"x": x})
    assert np.allclose(ref[:, :4], zeroed[:, :4]) and not zeroed[:, 4:].any()
    assert quality("r2", [ref], [zeroed], None).drop > 0.9
    assert quality("cosine", [ref], [zeroed], None).drop < 0.01  # what the old default reported


def test_r2_gives_input_independent_parts_no_weight():
    """A constant part (the anchor grid) adds nothing to a channel's scale: the same error on the
    learned offsets is the same drop with the grid as without it."""
    x = features(100, 2)
    (ref,) = run(detector(), {"x": x})
    noisy = ref + 0.1 * np.random.default_rng(3).standard_normal(ref.shape).astype(np.float32) * ref.std(axis=0)
    grid = numpy_helper.to_array(next(t for t in detector().graph.initializer if t.name == "grid"))
    no_grid = np.zeros_like(ref)
    no_grid[:, :4] = grid[0]
    with_grid = quality("r2", [ref], [noisy], None).drop
    assert with_grid == pytest.approx(quality("r2", [ref - no_grid], [noisy - no_grid], None).drop, rel=1e-6)
    assert 0.005 < with_grid < 0.02  # 1 - R^2 of a noise of a tenth of each element's spread: 0.01


@pytest.mark.parametrize("metric", ["auto", "cosine"])
def test_the_default_metric_keeps_a_detectors_class_scores(tmp_path, metric):
    """Converted at eps 0.01, the default keeps the class scores on inputs the conversion never
    saw; cosine, blind to them, lets their branch go."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=features(400, 4))
    model, report = compress(detector(), CompressConfig(eps=0.01, metric=metric, rank_multiple=1), str(calib))
    x = features(300, 5)
    (ref,), (out,) = run(detector(), {"x": x}), run(model, {"x": x})
    class_drop = quality("r2", [ref[:, 4:]], [out[:, 4:]], None).drop
    if metric == "auto":
        assert report.metric == "r2" and report.drop <= 0.01 and class_drop < 0.05
    else:
        assert report.metric == "cosine" and class_drop > 0.5


@pytest.mark.slow  # two minutes: make test-slow
def test_user_metric_in_python_on_a_real_model(tmp_path):
    """compress(..., metric=fn) with a task metric on the corpus's basic-pitch: eps bounds it, and
    every call gets the original's and the candidate's outputs on the same samples."""
    src = corpus.fetch(["basic_pitch"])["basic_pitch"]
    calib, unseen, _ = corpus_data.data("basic_pitch")
    path = tmp_path / "calib.npz"
    np.savez(path, **calib)
    calls = []

    def metric(reference, outputs, indices):
        calls.append(len(indices))
        # (the bound's bootstrap calls it on resamples: an index may come more than once)
        assert [r.shape for r in reference] == [o.shape for o in outputs] and len(indices) == len(reference[0])
        return note_frames_drop(reference, outputs)

    model, report = compress(str(src), CompressConfig(eps=0.05), str(path), metric=metric)
    assert report.metric.endswith("metric") and report.bound <= 0.05 and report.mac_ratio >= 1.0
    # the search part, then the held-out part (and its bootstrap resamples)
    assert calls[0] == report.calibration["search"] and report.calibration["heldout"] in calls
    original = onnx.load(str(src))
    x = {k: v[:40] for k, v in unseen.items()}
    assert note_frames_drop(run(original, x), run(model, x)) < 0.2  # unseen speech: the notes it found


def _write_metric(tmp_path, body: str):
    path = tmp_path / "mymetric.py"
    path.write_text("import numpy as np\n\n\ndef drop(reference, outputs):\n" + body)
    return path


def _convert(tmp_path, *extra):
    out = tmp_path / "out.onnx"
    calib = tmp_path / "calib.npz"
    x = np.load(MODELS / "mnist_test.npz")["image"][:300]
    np.savez(calib, image=x)
    result = CliRunner().invoke(app, ["convert", str(MODELS / "digit_cnn.onnx"), str(out), "--calib", str(calib),
                                      "--eps", "0.02", *extra])
    return result, out


def test_cli_metric_from_a_file(tmp_path):
    path = _write_metric(tmp_path, "    return float(np.mean(reference[0].argmax(1) != outputs[0].argmax(1)))\n")
    result, out = _convert(tmp_path, "--metric", f"{path}:drop", "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert out.exists() and f"{path}:drop drop" in result.output


@pytest.mark.parametrize("body, phrase", [
    ("    raise ValueError('no boxes in this batch')\n", "raised ValueError: no boxes in this batch"),
    ("    return 'small'\n", "returned 'small', not a number"),
    ("    return float('nan')\n", "must be a finite number"),
])
def test_a_failing_user_metric_is_one_line_naming_it(tmp_path, body, phrase):
    path = _write_metric(tmp_path, body)
    result, out = _convert(tmp_path, "--metric", f"{path}:drop")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --metric {path}:drop") and phrase in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("spec, phrase", [("no_such_module_here:drop", "cannot load it: ModuleNotFoundError"),
                                          ("missing.py:drop", "no such file"),
                                          ("onnx_lowrank.metrics.quality:METRICS", "is not a function")])
def test_a_user_metric_that_cannot_be_loaded_is_one_line(tmp_path, spec, phrase):
    result, out = _convert(tmp_path, "--metric", spec)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and phrase in lines[0], result.output
    assert not out.exists()


def test_a_user_metric_raising_mid_search_is_one_line(tmp_path):
    """The first call (the original against itself) passes; a later one fails."""
    path = _write_metric(tmp_path, "    if not np.array_equal(reference[0], outputs[0]):\n"
                                   "        raise RuntimeError('candidate rejected')\n    return 0.0\n")
    result, out = _convert(tmp_path, "--metric", f"{path}:drop")
    assert result.exit_code == 2 and "raised RuntimeError: candidate rejected" in result.output
    assert not out.exists()


def test_a_held_out_part_too_small_to_bound_eps_warns(tmp_path):
    """200 samples, 160 held out: no count on 160 bounds eps 0.005 at 0.9 (with none changed, the
    bound is 0.0102); the warning says how many would, and the model written is bounded at the
    lower confidence in force, within eps."""
    x, y = np.load(MODELS / "mnist_test.npz")["image"][:200], np.load(MODELS / "mnist_test.npz")["labels"][:200]
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x, labels=y)
    with pytest.warns(UserWarning, match="cannot be bounded at confidence 0.9 on 160 held-out samples"):
        _, report = compress(str(MODELS / "digit_cnn.onnx"), CompressConfig(eps=0.005), str(calib), "labels")
    assert report.resolution.startswith("160 held-out samples: one changed sample is 0.0063")
    assert report.confidence < 0.9 and report.bound <= 0.005

def _binary_filter(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A content filter's two-class softmax: the positive score sigmoid(w.x - 5), near 0 on
    ordinary inputs (w.x stays under 5: top-1 is class 0 on every one), thresholded by its users."""
    p = 1 / (1 + np.exp(-(x @ w - 5.0)))
    return np.stack([1 - p, p], axis=1).astype(np.float32)


def test_a_binary_filter_that_never_flips_is_measured_on_its_score():
    """Gutted (the score constant), the filter's top-1 never changes: agreement says 0, the
    default (r2 on the two scores) registers it; a harmless change (weights off by 0.1%) passes."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((500, 16)), rng.standard_normal(16) / 4
    ref = _binary_filter(w, x)
    assert ref.argmax(1).max() == 0  # no sample is flagged: the top-1 never changes
    gutted = _binary_filter(np.zeros(16), x)
    harmless = _binary_filter(w * (1 + 1e-3 * rng.standard_normal(16)), x)
    for labels in (None, np.zeros(500, np.int64)):
        assert str(resolve_metric("auto", [ref], labels)) == "r2"
    assert quality("agreement", [ref], [gutted], None).drop == 0.0  # what the old default saw
    assert quality("r2", [ref], [gutted], None).drop > 0.9
    assert quality("r2", [ref], [harmless], None).drop < 0.005


def test_counts_measure_classifiers_whose_top1_varies():
    rng = np.random.default_rng(1)
    varied = rng.standard_normal((200, 10)).astype(np.float32)
    constant = varied.copy()
    constant[:, 3] += 100  # class 3 on every sample
    assert str(resolve_metric("auto", [varied], None)) == "agreement"
    assert str(resolve_metric("auto", [varied], np.zeros(200, np.int64))) == "accuracy"
    assert str(resolve_metric("auto", [constant], None)) == "r2"
    assert str(resolve_metric("agreement", [constant], None)) == "agreement"  # asked for by name, it is kept


def test_small_class_scores_beside_pixel_boxes_count_on_their_own_scale():
    """A YOLO-type output: 4 rows of pixel boxes (variance ~1e4) beside 4 rows of class scores near
    0 (variance ~4e-6). Halving the scores is registered (1 - R^2 about 1.8 on each class row); a
    change of a thousandth of them is not. A floor set by the boxes' variance (1e-6 of their mean)
    would have put the halving under 0.001."""
    rng = np.random.default_rng(4)
    n, anchors = 300, 50
    boxes = 320 + 100 * rng.standard_normal((n, 4, anchors))
    scores = 0.01 / (1 + np.exp(-rng.standard_normal((n, 4, anchors))))
    ref = np.concatenate([boxes, scores], axis=1).astype(np.float32)
    halved, nudged = ref.copy(), ref.copy()
    halved[:, 4:] *= 0.5
    nudged[:, 4:] *= 1 + 1e-3 * rng.standard_normal((n, 4, anchors)).astype(np.float32)
    assert quality("r2", [ref], [halved], None).drop > 0.5
    assert quality("r2", [ref], [nudged], None).drop < 0.005


def _score_map_detector(silent_bias: float = -7.0, live_scale: float = 1.0) -> onnx.ModelProto:
    """A text-detector-type head on the default model's trained trunk (its first residual block,
    64 channels at 14x14): one Conv writes two score maps, sigmoids written channels-last
    (samples, H, W, 2) as CRAFT's export does. Map 0 is live (variance ~0.05 on MNIST pages);
    map 1, a link map on pages with little text, stays near 0.001 (variance ~1e-7)."""
    trunk = onnx.shape_inference.infer_shapes(onnx.load(str(MODELS / "mnist_cnn.onnx")))
    feature = "/blocks/blocks.0/Relu_1_output_0"
    model = onnx.utils.Extractor(trunk).extract_model(["image"], [feature])
    rng = np.random.default_rng(0)
    w = np.zeros((2, 64, 1, 1), np.float32)
    w[:, :, 0, 0] = rng.standard_normal((2, 64)) / 8 / 0.78 * np.array([[2.0 * live_scale], [0.35]])
    model.graph.initializer.extend([numpy_helper.from_array(w, "head_w"),
                                    numpy_helper.from_array(np.array([-2.0, silent_bias], np.float32), "head_b")])
    model.graph.node.extend([helper.make_node("Conv", [feature, "head_w", "head_b"], ["logits"]),
                             helper.make_node("Sigmoid", ["logits"], ["maps"]),
                             helper.make_node("Transpose", ["maps"], ["score"], perm=[0, 2, 3, 1])])
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 14, 14, 2]))
    return model


def test_a_near_silent_score_map_does_not_hold_the_model_back():
    """A shift of 1e-4 in the silent map (0.0011 to 0.0012, where users threshold at 0.3 or more)
    is 1 - R^2 = 0.45 on that map's own scale, and a drop of 0.08 with the two maps counted alike:
    refused. Its layer's floor lets it pass; damage to either map is still registered: the live
    one's weights halved, the silent one lit up to 0.31 everywhere."""
    from onnx_lowrank.graph.outputs import Layout, output_layouts

    x, _ = mnist_test_images(400)
    original = _score_map_detector()
    metric = resolve_metric("auto", run(original, {"image": x}), None, layouts=output_layouts(original))
    assert metric.layouts == (Layout(axis=3, layers=((0, 2),), rank=4),)
    (ref,) = run(original, {"image": x})
    assert ref[..., 0].var() > 0.02 and ref[..., 1].var() < 1e-6
    (shifted,), (halved,), (lit,) = (run(_score_map_detector(**kw), {"image": x}) for kw in
                                     ({"silent_bias": -6.9}, {"live_scale": 0.5}, {"silent_bias": -1.0}))
    assert quality("r2", [ref[..., 1:]], [shifted[..., 1:]], None).drop > 0.3  # on its own scale
    assert quality("r2", [np.moveaxis(ref, 3, 1)], [np.moveaxis(shifted, 3, 1)], None).drop > 0.05
    assert quality(metric, [ref], [shifted], None).drop < 0.001
    assert quality(metric, [ref], [halved], None).drop > 0.05
    assert quality(metric, [ref], [lit], None).drop > 1.0


def _row_encoder(bias_shift: float = 0.0, dead: int | None = None) -> onnx.ModelProto:
    """A (samples, tokens, features) output as a transformer's MatMul writes it: each of an MNIST
    image's 28 pixel rows is a token, projected to 8 features (trained-free weights of fixed seed).
    Blank rows at the top and bottom of a digit carry only the bias."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((28, 8)) / 4).astype(np.float32)
    if dead is not None:
        w[:, dead] = 0
    b = (1.0 + rng.random(8) + bias_shift).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["image", "shape"], ["rows"]),
             helper.make_node("MatMul", ["rows", "w"], ["projected"]),
             helper.make_node("Add", ["projected", "b"], ["tokens"])]
    return make_model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 28, 28])],
                      [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["n", 28, 8])],
                      [numpy_helper.from_array(np.array([-1, 28, 28], np.int64), "shape"),
                       numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def test_sequence_outputs_take_the_last_axis_as_the_channel():
    """(samples, tokens, features): with the tokens as channels, blank rows (only the bias, no
    variation) count a bias shift of 0.01 (under 1%) as a drop over eps; with the features as channels
    it is nothing, and a feature lost is an eighth."""
    from onnx_lowrank.graph.outputs import Layout, output_layouts

    x, _ = mnist_test_images(400)
    original = _row_encoder()
    (ref,), (shifted,), (dead,) = (run(m, {"image": x}) for m in
                                   (original, _row_encoder(bias_shift=1e-2), _row_encoder(dead=5)))
    metric = resolve_metric("auto", [ref], None, layouts=output_layouts(original))
    assert metric.layouts == (Layout(axis=2, layers=((0, 8),), rank=3),)
    assert quality("r2", [ref], [shifted], None).drop > 0.005   # axis 1: the tokens
    assert quality(metric, [ref], [shifted], None).drop < 0.001
    assert quality(metric, [ref], [dead], None).drop == pytest.approx(1 / 8, rel=0.05)
