"""A small BERT-shaped encoder, built in code with transformers' own BertModel and exported the
four ways models/minilm.py exports the real MiniLM (optimum; torch.onnx legacy and dynamo, with
sentence-transformers' pooling; the optimum export after onnxruntime's transformer optimizer):
each converts within eps on padded token batches, every skipped node says why (the attention
products of two activations, the fused com.microsoft ops), and factors at full rank reproduce it.
Beside them: padding stays out of the layers' statistics, and sentence embeddings are not taken
for class scores.

Its projections are made low-rank (rank 6 of 48, plus a little noise) so that the conversion has
something to find; the real encoder's numbers are benchmarks/minilm_exports.py's."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper

from helpers import MODELS, compress, make_model, rel_err, run
from onnx_lowrank.calibration.capture import capture
from onnx_lowrank.calibration.data import load_calibration, without_padding
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.graph import find_targets, prepare
from onnx_lowrank.graph.targets import FUSED_REASON, attention_projections
from onnx_lowrank.metrics.quality import resolve_metric
from onnx_lowrank.pipeline import compress_file

sys.path.insert(0, str(MODELS))
import minilm  # noqa: E402

HIDDEN, HEADS, LAYERS, VOCAB, SEQ = 48, 4, 2, 300, 24
EPS = 0.01


def token_batch(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """n token sequences of 4 to length - 1 tokens ([CLS] ... [SEP]), padded to `length`."""
    rng = np.random.default_rng(seed)
    feed = {k: np.zeros((n, length), np.int64) for k in minilm.INPUTS}
    for i in range(n):
        m = int(rng.integers(4, length))
        feed["input_ids"][i, :m] = np.r_[101 % VOCAB, rng.integers(5, VOCAB, m - 2), 102 % VOCAB]
        feed["attention_mask"][i, :m] = 1
    return feed


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A 2-layer BertModel whose Linear weights are rank 6 plus noise, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                     max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():
        for module in bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                out, k = module.weight.shape
                low = torch.randn(out, 6) @ torch.randn(6, k) / np.sqrt(6 * k)
                module.weight.copy_(low + 1e-3 * torch.randn(out, k))
    folder = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def exports(bert_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    bert = transformers.BertModel.from_pretrained(str(bert_folder)).eval()
    example = token_batch(2, 16, seed=1)
    paths = {name: out / f"{name}.onnx" for name in minilm.EXPORTS}
    minilm.export_optimum(paths["optimum"], bert_folder)
    minilm.export_torch(paths["torch_legacy"], dynamo=False, module=minilm.pooled(bert), example=example)
    minilm.export_torch(paths["torch_dynamo"], dynamo=True, module=minilm.pooled(bert), example=example)
    minilm.optimize_ort(paths["optimum"], paths["ort_optimized"], num_heads=HEADS, hidden=HIDDEN)
    return paths


@pytest.mark.parametrize("name", minilm.EXPORTS)
def test_export_converts_within_eps(name, exports, tmp_path):
    src = exports[name]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **token_batch(160, SEQ, seed=2))
    before = src.read_bytes()
    dst = tmp_path / "out.onnx"
    report = compress_file(src, dst, CompressConfig(eps=EPS, rank_multiple=1), calibration=str(calib))
    assert src.read_bytes() == before
    assert report.metric == "r2"  # token states, or unit-length embeddings: not class scores
    assert report.drop <= EPS
    assert report.macs_after < 0.7 * report.macs_before, "the rank-6 projections were not found"
    factored = [l for l in report.layers if l.method]
    projections = 6 * LAYERS if name != "ort_optimized" else 3 * LAYERS  # Attention packs Q, K, V
    assert len(report.layers) == projections and len(factored) >= projections // 2
    reasons = {s["op_type"]: s["reason"] for s in report.skipped}
    fusion_lost = [w for w in report.warnings if "attention projections" in w]
    if name == "ort_optimized":
        assert reasons == {"com.microsoft.Attention": FUSED_REASON} and not fusion_lost
        assert sum(s["op_type"] == "com.microsoft.Attention" for s in report.skipped) == LAYERS
    else:  # Q K^T and the attention-weighted V: two activations, no weight
        assert reasons == {"MatMul": "no constant weight: both inputs are computed at run time"}
        assert len(report.skipped) == 2 * LAYERS
        assert fusion_lost  # the rank-6 Q, K, V and output projections were factored

    # dynamic batch and sequence: unseen sequences of another padded length run, and stay close
    original, written = onnx.load(str(src)), onnx.load(str(dst))
    onnx.checker.check_model(written)
    feed = token_batch(7, 40, seed=3)
    ref, out = run(original, feed)[0], run(written, feed)[0]
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    assert rel_err(out, ref) < 0.2


@pytest.mark.parametrize("name", minilm.EXPORTS)
def test_full_rank_factors_reproduce_the_export(name, exports):
    model = onnx.load(str(exports[name]))
    factored = compress(model, "svd")  # every projection factored at full rank
    assert sum(n.op_type == "MatMul" for n in factored.graph.node) > sum(n.op_type == "MatMul" for n in model.graph.node)
    feed = token_batch(5, 20, seed=4)
    assert rel_err(run(factored, feed)[0], run(model, feed)[0]) < 1e-5


def test_attention_projections_are_found(exports):
    """Q, K, V and the output projection of each block: what onnxruntime's optimizer fuses."""
    for name in ("optimum", "torch_legacy"):
        model = prepare(onnx.load(str(exports[name])))
        targets, _ = find_targets(model)
        found = attention_projections(model, {t.name for t in targets})
        assert len(found) == 4 * LAYERS
        assert all(("attention" in n and n.endswith("MatMul")) for n in found), sorted(found)


def test_padding_is_left_out_of_the_statistics(tmp_path):
    """A dense layer's second moment is that of its inputs at real tokens (attention_mask 1)."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W")
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="dense"),
                        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("m", TensorProto.FLOAT, None)], [w])
    x = rng.standard_normal((40, 10, 6)).astype(np.float32)
    mask = (np.arange(10) < rng.integers(1, 11, 40)[:, None]).astype(np.int64)
    x[mask == 0] = 100.0  # padding vectors far off: counted, they would swamp the moment
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    prepared = prepare(model)
    targets, _ = find_targets(prepared)
    stats, _ = capture(prepared, targets, load_calibration(str(tmp_path / "calib.npz"), prepared))
    s = stats["dense"]
    real = x[mask == 1].astype(np.float64)
    assert s.rows == len(real)
    assert np.allclose(s.second_moment(shrink=False), real.T @ real / len(real), rtol=1e-4)


def test_unit_length_embeddings_are_not_class_scores():
    rng = np.random.default_rng(6)
    e = rng.standard_normal((50, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert str(resolve_metric("auto", [e], None)) == "r2"
    logits = 10 * rng.standard_normal((50, 16))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # confident: rows of near-unit length
    assert str(resolve_metric("auto", [probs], None)) == "agreement"
    assert str(resolve_metric("auto", [logits], None)) == "agreement"


def test_token_outputs_are_zero_at_padding(exports, tmp_path):
    """Token states at padding are zero in the original's outputs and in every candidate's, so a
    change there (a model computes them and throws them away) adds nothing to the drop."""
    from onnx_lowrank.runtime.sessions import predict

    model = onnx.load(str(exports["optimum"]))
    np.savez(tmp_path / "c.npz", **token_batch(12, SEQ, seed=7))
    data = load_calibration(str(tmp_path / "c.npz"), model)
    states = predict(model, data)[0]
    mask = data.inputs["attention_mask"].astype(bool)
    assert np.all(states[~mask] == 0) and np.all(np.abs(states[mask]).sum(-1) > 0)
    per_sample = np.ones((12, SEQ))  # as wide as the sequence, but one row a sample: not masked
    assert np.array_equal(without_padding(per_sample, mask), per_sample)


@pytest.mark.parametrize("name", ["optimum", "torch_legacy"])
def test_finetune_runs_on_the_encoder(name, exports, tmp_path):
    """The PyTorch bridge takes the exported encoder (onnx2torch), distils it on unlabeled token
    batches, and the result is checked like any other: within eps, interface kept."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, **token_batch(120, SEQ, seed=8))
    dst = tmp_path / "out.onnx"
    report = compress_file(exports[name], dst, CompressConfig(eps=EPS, finetune_epochs=1), calibration=str(calib))
    assert report.drop <= EPS and report.finetune and report.finetune[0]["drop_after"] is not None
    feed = token_batch(3, 30, seed=9)
    assert run(onnx.load(str(dst)), feed)[0].shape == run(onnx.load(str(exports[name])), feed)[0].shape
