"""The corpus of real third-party ONNX models (models/corpus.py: paddle2onnx, tf2onnx, PyTorch,
spox exports) converted by the real CLI at one eps with the default options, and judged on inputs
the converter never saw.

    .venv/bin/python benchmarks/zoo.py [--models ocr_rec,magika,...] [--eps 0.01] [--keep DIR] [--skip-slow]
                                       [--quantize int8]

Protocol, per model:
- data: models/corpus_data.py's calibration and unseen parts (split by source: different photos,
  files, sentences), written as calib.npz / unseen.npz keyed by input name; calib.npz also holds
  "groups", each calibration sample's source (corpus_data.groups: photo, file, sentence);
- convert: `onnx-lowrank convert IN OUT --eps EPS --calib calib.npz --groups groups --report r.json`
  in its own process (nothing else), its wall time and its own peak RSS (under /usr/bin/time -f %M);
  the converter decides on the held-out part of calib.npz (whole groups): its drop there and the
  upper confidence bound of it (at the level in force) are columns;
- judge: the original and the written file in onnxruntime over the unseen part, the drop under
  the metric the report names (the converter chose it: agreement for classifiers, else r2), and
  under the model's own task metric (models/corpus_tasks.py: text-region IoU of the detector's
  map, the recognizer's decoded strings, the VAD's speech decisions, basic-pitch's note frames,
  the classifiers' top-1), to show whether the converter's metric tracks what users measure.
A conversion that fails is a row with the CLI's one-line error; the exit status is 0 all the same.
"""

from __future__ import annotations

import os

# one BLAS thread: OpenBLAS's spinning threads slow everything down several times on shared cores
# (as the other benchmarks; the converter's own subprocesses inherit it)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # (after the environment is set)
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
import corpus
import corpus_data
from corpus_tasks import TASKS

from onnx_lowrank.calibration.data import load_calibration
from onnx_lowrank.errors import first_line
from onnx_lowrank.graph.outputs import output_layouts
from onnx_lowrank.metrics.quality import quality, resolve_metric
from onnx_lowrank.runtime.sessions import predict

CLI = Path(sys.executable).with_name("onnx-lowrank")
SLOW = ("ocr_det",)
TIMEOUT = 3600  # seconds per conversion; past it the child is killed and the row says so


@dataclass
class Row:
    key: str
    converted: str = ""              # "yes", or the CLI's error line
    report: dict | None = None
    unseen: str = ""                 # the measured drop, or why there is none
    unseen_drop: float | None = None
    task_drop: float | None = None   # the model's own task metric (models/corpus_tasks.py) on the unseen part
    seconds: float = 0.0
    rss_mb: float | None = None
    status: int | None = None
    notes: list[str] = field(default_factory=list)


def short_exporter(text: str) -> str:
    """'paddle2onnx (no producer name; p2o.* dims), opset 12' -> 'paddle2onnx, opset 12'; short
    parentheticals such as '(dynamo)' stay."""
    return re.sub(r"\s*\([^)]{12,}\)", "", text)


def run_cli(args: list[str], log: Path, timeout: float) -> tuple[int, float, float | None]:
    """(exit status, wall seconds, peak RSS in MB) of the CLI run as its own process, under
    /usr/bin/time -f %M: that is the converter's own maximum. (os.wait4 on a child of this script
    would not do: Linux carries the peak RSS of the forking process over exec into the child's, so
    every row would read at least this script's own peak, which grows as it runs the models.)"""
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        # own session: a timeout kills the converter and whatever it started, nothing else
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), str(CLI), *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
        seconds = time.perf_counter() - start
    # time writes "Command exited with non-zero status N" (or "...terminated by signal N") first
    text = rss_file.read_text() if rss_file.exists() else ""
    words = text.split()
    rss = int(words[-1]) / 1024 if words and words[-1].isdigit() else None
    if status > 128 and "signal" in text:
        status = 128 - status  # killed by signal N: report it as Popen would, -N
    return status, seconds, rss


def error_line(log: Path, status: int) -> str:
    """The CLI's one-line error (the last 'error: ...' line), else the last line it printed."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1]
    if status < 0:
        return f"killed by signal {-status}" + (f" (last line: {lines[-1]})" if lines else "")
    return f"exit {status}" + (f": {lines[-1]}" if lines else " (no output)")


def unbounded_warnings(log: Path) -> list[str]:
    """The CLI's warning lines saying eps cannot be bounded at the confidence asked (the held-out
    part too small: the model is then bounded at a lower level, the report's `confidence`) or at
    all (too few groups for a bootstrap: nothing is factored)."""
    lines = re.split(r"[\r\n]+", log.read_text(errors="replace"))  # (progress lines end in \r)
    return [f"converter warning: {ln[ln.index('warning:') + 8:].strip()}" for ln in lines
            if "warning:" in ln and ("cannot be bounded" in ln or "too few to bound" in ln)]


def unseen_drop(key: str, src: Path, dst: Path, unseen: Path, metric: str) -> tuple[float, float, str]:
    """The drop of the written file against the original on the unseen part, in onnxruntime,
    under the converter's metric and under the model's own task metric; and a note when the
    written file outputs exactly zero where the original does not."""
    original = onnx.load(str(src))
    data = load_calibration(str(unseen), original)
    reference = predict(original, data)
    outputs = predict(onnx.load(str(dst)), data)
    notes = []
    for name, ref, out in zip((o.name for o in original.graph.output), reference, outputs):
        ref_zero = ~np.any(ref.reshape(len(ref), -1) != 0, axis=1)
        out_zero = ~np.any(out.reshape(len(out), -1) != 0, axis=1)
        if np.any(out_zero & ~ref_zero):
            notes.append(f"output {name!r} of the written file is all zeros on {int(np.sum(out_zero & ~ref_zero))} "
                         f"of {len(out)} unseen samples where the original's is not")
        if np.any(ref_zero):
            notes.append(f"output {name!r} of the original is all zeros on {int(np.sum(ref_zero))} of {len(ref)} "
                         "unseen samples")
    judged = resolve_metric(metric, reference, None, layouts=output_layouts(original))  # as the converter reads it
    return quality(judged, reference, outputs, None).drop, TASKS[key][1](reference, outputs), "; ".join(notes)


def convert(key: str, src: Path, folder: Path, eps: float, extra: list[str]) -> Row:
    row = Row(key)
    calib, unseen_part, _ = corpus_data.data(key)
    assert "groups" not in calib, f"{key}: a model input named 'groups' would clash with --groups groups"
    work = folder / key
    work.mkdir(parents=True, exist_ok=True)
    calib_file, unseen_file = work / "calib.npz", work / "unseen.npz"
    np.savez(calib_file, **calib, groups=corpus_data.groups(key))
    np.savez(unseen_file, **unseen_part)
    dst, report_file, log = work / "out.onnx", work / "r.json", work / "convert.log"
    for stale in (dst, report_file):
        stale.unlink(missing_ok=True)
    row.status, row.seconds, row.rss_mb = run_cli(
        ["convert", str(src), str(dst), "--eps", str(eps), "--calib", str(calib_file),
         "--groups", "groups", "--report", str(report_file), *extra], log, TIMEOUT)
    row.notes += unbounded_warnings(log)
    if row.status != 0:
        row.converted = error_line(log, row.status)
        if row.seconds > TIMEOUT:
            row.converted = f"timed out after {TIMEOUT}s ({row.converted})"
        return row
    if not dst.exists() or not report_file.exists():
        row.converted = f"exit 0 but {'no model' if not dst.exists() else 'no report'} written"
        return row
    row.converted = "yes"
    row.report = json.loads(report_file.read_text())
    row.notes += [f"converter warning: {w}" for w in row.report.get("warnings", [])
                  if f"converter warning: {w}" not in row.notes]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.unseen_drop, row.task_drop, note = unseen_drop(key, src, dst, unseen_file, row.report["metric"])
        row.unseen = f"{row.unseen_drop:.4f}"
        if note:
            row.notes.append(note)
    except Exception as e:  # noqa: BLE001  (a benchmark reports: the written file failing here IS a result)
        row.unseen = f"failed: {type(e).__name__}: {first_line(e)}"
    return row


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f} MB"


def _bound(r: dict) -> str:
    """The report's bound (null: too few groups to bound anything)."""
    return "none" if r["bound"] is None else f"{r['bound']:.4f}"


def _held_out(r: dict, source: str) -> str:
    """'140 of 200, 14 of 20 sentences': the held-out samples and the groups they came from."""
    cal = r["calibration"]
    text = f"{r['check_samples']} of {cal['samples']}"
    if r.get("groups") is not None:
        text += f", {r['groups']} of {cal['groups']} {source}s"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(corpus.MODELS), help="comma-separated corpus keys")
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs (models, reports, logs) here")
    parser.add_argument("--skip-slow", action="store_true", help=f"skip {', '.join(SLOW)}")
    parser.add_argument("--quantize", default=None, help="pass --quantize (int8) to every conversion")
    args = parser.parse_args()
    extra = ["--quantize", args.quantize] if args.quantize else []
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in corpus.MODELS]
    if unknown:
        raise SystemExit(f"unknown corpus model(s) {', '.join(unknown)}; known: {', '.join(corpus.MODELS)}")
    console = Console(width=260)
    paths = corpus.fetch(keys)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="onnx-lowrank-zoo-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    descriptions: dict[str, str] = {}
    try:
        for key in keys:
            descriptions[key] = corpus_data.data(key)[2]
            if args.skip_slow and key in SLOW:
                rows.append(Row(key, converted="skipped (--skip-slow)"))
                continue
            try:
                row = convert(key, paths[key], folder, args.eps, extra)
            except Exception as e:  # noqa: BLE001  (data building or writing, not the converter)
                row = Row(key, converted=f"benchmark failed: {type(e).__name__}: {first_line(e)}")
            rows.append(row)
            r = row.report
            console.print(f"{key}: {row.converted if r is None else 'converted'}"
                          + (f", {r['mac_ratio']:.2f}x MACs, {r['metric']} held-out drop {r['drop']:.4f} "
                             f"({_held_out(r, corpus_data.GROUP_SOURCE[key])}), bound {_bound(r)} at "
                             f"{r['confidence']:g} ({r['bound_method']}), unseen {row.unseen}, "
                             f"unseen {TASKS[key][0]} drop {row.task_drop}" if r else "")
                          + f", {row.seconds:.0f}s, {_mb(row.rss_mb)}", highlight=False)
            sys.stdout.flush()
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    options = " ".join(extra) or "(default options)"
    table = Table(title=f"corpus models converted by `onnx-lowrank convert --eps {args.eps}` {options}, "
                        "judged on unseen inputs")
    for col in ("model", "exporter", "converted", "MAC ratio", "param ratio", "factored", "metric", "held-out",
                "held-out drop", "bound (level)", "unseen drop", "within eps", "task metric", "unseen task drop",
                "convert time", "peak RSS"):
        table.add_column(col, overflow="fold", justify="left" if col in ("model", "exporter", "converted",
                                                                           "metric", "held-out") else "right")
    for row in rows:
        r = row.report
        exporter = short_exporter(corpus.MODELS[row.key].exporter)
        ran = row.status is not None
        timing = (f"{row.seconds:.0f}s", _mb(row.rss_mb)) if ran else ("", "")
        if r is None:
            table.add_row(row.key, exporter, row.converted, *[""] * 11, *timing)
            continue
        within = "" if row.unseen_drop is None else ("yes" if row.unseen_drop <= args.eps else "NO")
        if any("of the written file" in note for note in row.notes):
            within += " (see note)"
        if r["bound"] is None or r["bound"] > args.eps:
            within = f"{within} (bound NO)".strip()
        task = "" if row.task_drop is None else f"{row.task_drop:.4f}"
        factored = (f"{sum(layer['method'] is not None for layer in r['layers'])} of "
                    f"{len(r['layers']) + len(r['skipped'])}")
        if r.get("quantization"):  # --quantize: the layers written int8, and the file against the original's
            factored += (f"; {r['quantization']['int8_layers']} int8, file "
                         f"{r['file_size_before'] / max(r['file_size_after'], 1):.1f}x smaller")
        table.add_row(row.key, exporter, row.converted, f"{r['mac_ratio']:.2f}x", f"{r['param_ratio']:.2f}x",
                      factored, r["metric"], _held_out(r, corpus_data.GROUP_SOURCE[row.key]), f"{r['drop']:.4f}",
                      f"{_bound(r)} ({r['confidence']:g})", row.unseen, within, TASKS[row.key][0], task,
                      *timing)
    console.print(table)
    for row in rows:
        for note in row.notes:
            console.print(f"[bold red]{row.key}[/bold red]: {escape(note)}", highlight=False, soft_wrap=True)
    for key, text in descriptions.items():
        text = text.removeprefix(f"{key}:").strip()  # the builders start with the key themselves
        sizes = np.unique(corpus_data.groups(key), return_counts=True)[1]
        text += (f"; --groups: {len(sizes)} {corpus_data.GROUP_SOURCE[key]}s"
                 + (f" of {sizes[0]} sample(s) each" if sizes.min() == sizes.max() else
                    f" of {', '.join(map(str, sorted(sizes, reverse=True)))} samples" if len(sizes) <= 10 else
                    f" of {sizes.min()}-{sizes.max()} samples"))
        console.print(f"[bold]{key}[/bold]: {escape(text)}", highlight=False, soft_wrap=True)
    if args.keep is not None:
        console.print(f"outputs kept in {folder}/<model>/ (out.onnx, r.json, convert.log, calib.npz, unseen.npz)",
                      highlight=False)


if __name__ == "__main__":
    main()
