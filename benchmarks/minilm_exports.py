"""all-MiniLM-L6-v2 (real weights) through the converter, export by export, judged on the
sentences of news articles the conversion never saw (models/minilm.py builds both).

    .venv/bin/python benchmarks/minilm_exports.py [--eps 0.01] [--calib 512] [--finetune-epochs 0]
                                                [--exports optimum,torch_legacy,...] [--ranks 288,192]
                                                [--distill-ranks 192,128 --distill-epochs 8]

Table 1, per export: converted (or the error), MAC and parameter ratios of the whole model at
sequence length 128, the drop on the held-out part of the calibration sentences (what decides)
and its upper confidence bound, on the unseen sentences: r2 drop of the sentence embeddings, mean 1 - cosine, top-1 retrieval
agreement (each unseen sentence's nearest other unseen sentence, by the original's embeddings
and by the compressed one's), the convert time, and onnxruntime CPU latency at batch 1 and 32
(sequence 128) of the original and the compressed model, both after onnxruntime's transformer
optimizer, timed in turn in one run.

Table 2, the torch_legacy export at equal ranks (every projection at rank R): plain SVD of the
weights, our data-aware SVD (whitened by the second moment of the layer's inputs at real
tokens, shrunk toward its diagonal by width / rows), and SVD-LLM's truncation-aware whitening
written out here from the paper (Wang et al. 2024: S = Cholesky(X X^T), SVD of W S, truncated,
W' = U_r S_r V_r^T S^-1) on the same inputs without the shrinkage. Unseen r2 drop and 1 - cos.

Table 3 (`--distill-ranks`), how far distillation takes those models: optimum's export with every
projection at rank R (our factors), as a torch module (the converter's onnx2torch bridge),
distilled token by token towards the original's `last_hidden_state` on all the calibration
articles' sentences, each batch padded only to its longest sentence, with AdamW; the unseen r2 of
the sentence embeddings after each epoch. This is a stronger loop than `--finetune-epochs` (SGD
on the model's own output, sentences padded to 128), to bound what fine-tuning on this text can do.

Sentence embeddings: the export's own `sentence_embedding` (torch exports, with
sentence-transformers' pooling inside), or the mean of `last_hidden_state` over the attention
mask, L2-normalised (optimum's export, which leaves the pooling to the caller: its drop is then
that of the token states, which the default r2 measures position by position, padding included).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import minilm  # noqa: E402
from onnx_lowrank.calibration.capture import capture  # noqa: E402
from onnx_lowrank.calibration.data import CalibrationSet, load_calibration  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.decompositions import decompose  # noqa: E402
from onnx_lowrank.decompositions.svd import SVDFactors  # noqa: E402
from onnx_lowrank.errors import OnnxLowrankError  # noqa: E402
from onnx_lowrank.graph import find_targets, prepare, replace_layers  # noqa: E402
from onnx_lowrank.metrics.quality import quality  # noqa: E402
from onnx_lowrank.pipeline import compress_file  # noqa: E402
from onnx_lowrank.runtime.latency import interleaved  # noqa: E402
from onnx_lowrank.runtime.sessions import predict, session  # noqa: E402


def embed(model: str | Path | onnx.ModelProto, feed: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    runs = []
    for i in range(0, len(feed["input_ids"]), batch):
        part = {k: v[i:i + batch] for k, v in feed.items() if k in wanted}
        runs.append(minilm.embeddings(dict(zip(names, sess.run(names, part))), part["attention_mask"]))
    return np.concatenate(runs)


def judged(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """r2 drop, mean 1 - cosine and top-1 retrieval agreement of embeddings `out` against `ref`."""
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {"r2": quality("r2", [ref], [out], None).drop, "cos": float(1 - cos.mean()),
            "retrieval": float(np.mean(nearest(ref) == nearest(out)))}


def latencies(original: Path, compressed: Path, work: Path) -> dict[int, tuple[float, float]]:
    """ms per run at batch 1 and 32 (sequence 128): (original, compressed), both optimized."""
    paths = []
    for p in (original, compressed):
        q = work / f"{p.stem}.opt.onnx"
        minilm.optimize_ort(p, q)
        paths.append(q)
    sessions = [session(onnx.load(str(p)), "deploy") for p in paths]
    _, unseen = minilm.text()
    out = {}
    for batch in (1, 32):
        feed = minilm.encode(unseen[:batch])
        wanted = {i.name for i in sessions[0].get_inputs()}
        times = interleaved(sessions, {k: v for k, v in feed.items() if k in wanted}, min_runs=20, min_seconds=5)
        out[batch] = tuple(1e3 * float(np.median(t)) for t in times)
    return out


def convert_table(names, eps: float, calib: Path, unseen: dict, finetune: int, work: Path) -> None:
    print(f"\n## eps {eps}, {'fine-tuned ' + str(finetune) + ' epochs' if finetune else 'no fine-tuning'}\n")
    print("| export | result | MACs | params | held-out drop | its bound | unseen r2 | unseen 1-cos | "
          "retrieval top-1 | convert | batch 1 ms (orig → ours) | batch 32 ms (orig → ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        src = minilm.build(name)
        dst = work / f"{name}.lowrank.onnx"
        start = time.perf_counter()
        try:
            report = compress_file(src, dst, CompressConfig(eps=eps, finetune_epochs=finetune), calibration=str(calib))
        except OnnxLowrankError as e:
            print(f"| {name} | error: {e} |" + " |" * 10, flush=True)
            continue
        seconds = time.perf_counter() - start
        j = judged(embed(src, unseen), embed(dst, unseen))
        lat = latencies(src, dst, work)
        print(f"| {name} | {report.metric} | {report.mac_ratio:.2f}x | {report.param_ratio:.2f}x | "
              f"{report.drop:.4f} | {report.bound:.4f} | {j['r2']:.4f} | {j['cos']:.4f} | "
              f"{j['retrieval']:.3f} | {seconds:.0f} s | {lat[1][0]:.2f} → {lat[1][1]:.2f} | "
              f"{lat[32][0]:.1f} → {lat[32][1]:.1f} |", flush=True)


def svd_llm(layer, moment: np.ndarray, rank: int) -> SVDFactors:
    """SVD-LLM's truncation-aware whitening (Wang et al. 2024), from the paper: S the
    Cholesky factor of the inputs' second moment X X^T, the SVD U S_v V^T of W S truncated at
    `rank`, and W' = (U_r S_r^1/2)(S_r^1/2 V_r^T S^-1): truncating singular value i of W S costs
    exactly that value in ||(W - W') X||_F. A small ridge only if X X^T is not positive definite."""
    w = layer.weight.astype(np.float64)
    try:
        s = np.linalg.cholesky(moment)
    except np.linalg.LinAlgError:
        s = np.linalg.cholesky(moment + 1e-6 * np.trace(moment) / len(moment) * np.eye(len(moment)))
    u, sv, vt = np.linalg.svd(w @ s, full_matrices=False)
    root = np.sqrt(sv[:rank])
    first = (root[:, None] * vt[:rank]) @ np.linalg.inv(s)          # (r, in)
    second = u[:, :rank] * root                                     # (out, r)
    return SVDFactors(layer, first.astype(layer.weight.dtype), second.astype(layer.weight.dtype))


def projection_mac_ratio(chosen, stats) -> float:
    """MACs of the projections before / after, at the captured length (128 rows)."""
    spatial = {t.name: stats[t.name].in_spatial for t, _ in chosen}
    return sum(t.layer.macs(spatial[t.name]) for t, _ in chosen) / sum(f.macs(spatial[t.name]) for t, f in chosen)


def rank_table(calib: Path, unseen: dict, ranks: tuple[int, ...]) -> None:
    src = minilm.build("torch_legacy")
    model = prepare(onnx.load(str(src)))
    targets, _ = find_targets(model)
    stats, _ = capture(model, targets, load_calibration(str(calib), model))
    raw = {t.name: stats[t.name].second_moment(shrink=False) for t in targets}  # before ours shrinks them
    shrunk = {t.name: stats[t.name].second_moment() for t in targets}
    ref = embed(src, unseen)
    print("\n## equal ranks, torch_legacy: every projection at rank R (unseen r2 drop / 1 - cos)\n")
    print("| R | projections' MAC ratio | plain SVD | ours (data-aware) | SVD-LLM |")
    print("|---|---|---|---|---|")
    for r in ranks:
        rows = {}
        for how in ("plain", "ours", "svd-llm"):
            chosen = []
            for t in targets:
                if how == "plain":
                    f = decompose(t.layer, "svd", rank=r)
                elif how == "ours":
                    f = decompose(dataclasses.replace(t.layer, input_cov=shrunk[t.name]), "svd", rank=r)
                else:
                    f = svd_llm(t.layer, raw[t.name], r)
                chosen.append((t, f))
            out = replace_layers(model, chosen).model
            rows[how] = judged(ref, embed(out, unseen))
        macs = projection_mac_ratio(chosen, stats)
        print(f"| {r} | {macs:.2f}x | " + " | ".join(
            f"{rows[h]['r2']:.4f} / {rows[h]['cos']:.4f}" for h in ("plain", "ours", "svd-llm")) + " |", flush=True)


def distill_table(calib: Path, unseen: dict, ranks: tuple[int, ...], epochs: int, lr: float,
                  batch: int = 32) -> None:
    import torch
    from onnx_lowrank.bridge.convert import to_torch

    torch.manual_seed(0)
    src = minilm.build("optimum")
    model = prepare(onnx.load(str(src)))
    targets, _ = find_targets(model)
    stats, _ = capture(model, targets, load_calibration(str(calib), model))
    ref = embed(src, unseen)
    sentences, _ = minilm.text()
    feed = minilm.encode(sentences)
    names = list(minilm.INPUTS)
    teacher = torch.from_numpy(predict(model, CalibrationSet(feed), 64, ["last_hidden_state"])[0])
    mask = torch.from_numpy(feed["attention_mask"]).bool()
    scale = float(teacher[mask].pow(2).mean())  # the loss is relative to the states' own size
    lengths = feed["attention_mask"].sum(1)
    print(f"\n## distillation at equal ranks: optimum's export, AdamW lr {lr:g}, batch {batch}, "
          f"{len(sentences)} sentences of the calibration articles (training loss / unseen r2 drop)\n")
    header = ["R", "projections' MAC ratio", "before"] + [f"epoch {e + 1}" for e in range(epochs)] + ["s/epoch"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def states(module, inputs):
        out = module(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def unseen_r2(module) -> float:
        with torch.no_grad():
            runs = [states(module, [torch.from_numpy(unseen[n][i:i + 64]) for n in names]).numpy()
                    for i in range(0, len(unseen["input_ids"]), 64)]
        return judged(ref, minilm.embeddings({"last_hidden_state": np.concatenate(runs)}, unseen["attention_mask"]))["r2"]

    for r in ranks:
        chosen = [(t, decompose(dataclasses.replace(t.layer, input_cov=stats[t.name].second_moment()), "svd", rank=r))
                  for t in targets]
        macs = projection_mac_ratio(chosen, stats)
        module = to_torch(replace_layers(model, chosen).model)  # eval mode: no dropout
        cells = [f"{unseen_r2(module):.4f}"]
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(epochs):
            total = 0.0
            order = rng.permutation(len(sentences))
            for i in range(0, len(sentences), batch):
                idx = order[i:i + batch]
                n = int(lengths[idx].max())
                out = states(module, [torch.from_numpy(feed[k][idx, :n]) for k in names])
                m = mask[idx, :n]
                loss = (out[m] - teacher[idx, :n][m]).pow(2).mean() / scale
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            cells.append(f"{total / len(sentences):.4f} / {unseen_r2(module):.4f}")
        per_epoch = (time.perf_counter() - start) / max(epochs, 1)
        print(f"| {r} | {macs:.2f}x | " + " | ".join(cells) + f" | {per_epoch:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--calib", type=int, default=minilm.CALIB_SENTENCES, help="calibration sentences")
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--exports", default=",".join(minilm.EXPORTS), help="table 1's exports ('' to leave it out)")
    ap.add_argument("--ranks", default="288,192", help="table 2's ranks ('' to leave it out)")
    ap.add_argument("--distill-ranks", default="", help="table 3's ranks, e.g. 192,128 (left out by default)")
    ap.add_argument("--distill-epochs", type=int, default=8)
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    args = ap.parse_args()
    calib_sentences, unseen_sentences = minilm.text()
    unseen = minilm.encode(unseen_sentences)
    print(f"MiniLM-L6: {args.calib} calibration sentences of articles 0-{minilm.CALIB_ARTICLES - 1} (of "
          f"{len(calib_sentences)}), judged on {len(unseen_sentences)} sentences of the other articles; "
          f"padded to {minilm.SEQ} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.npz"
        np.savez(calib, **minilm.calibration(args.calib))
        names = [n for n in args.exports.split(",") if n]
        if names:
            convert_table(names, args.eps, calib, unseen, args.finetune_epochs, work)
        if args.ranks:
            rank_table(calib, unseen, tuple(int(r) for r in args.ranks.split(",")))
        if args.distill_ranks:
            distill_table(calib, unseen, tuple(int(r) for r in args.distill_ranks.split(",")),
                          args.distill_epochs, args.distill_lr)


if __name__ == "__main__":
    main()
