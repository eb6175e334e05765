"""Robustness: `convert` on a corpus of malformed inputs (tests/malformed_cases.py) — broken model
files, broken graphs, bad calibration data, output paths that cannot or must not be written, bad
option values. Every case must end in either

- exit 0 and a valid model at OUT (onnx's full check passes and onnxruntime runs it), or
- a non-zero exit with exactly one non-empty line on stderr, starting with `error:`,

and in every case: no traceback, no exception escaping the CLI, the input files byte for byte as
they were, and after a failure nothing new on disk (no OUT, no OUT.data, no temporary file or
folder, no report)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from malformed_cases import CASES, IDS, Case, Ctx, calib_arrays
from typer.testing import CliRunner

from onnx_lowrank.cli import app

CASE_TIMEOUT = 60  # seconds; a case that hangs (e.g. reading a pipe) fails instead of blocking the run


def test_corpus_has_at_least_200_distinct_cases():
    assert len(CASES) >= 200, len(CASES)
    assert len(set(IDS)) == len(IDS), sorted(i for i in IDS if IDS.count(i) > 1)
    families = {i.split("-")[0] for i in IDS}
    assert {"truncated", "bitflip", "not", "missing", "dtype", "shape", "nan", "inf", "empty", "cycle", "dup",
            "opset", "calib", "out", "report", "option"} <= families


# ---------------------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """A BaseException, so that no `except Exception` in the package swallows it."""


def _alarm(signum, frame):
    raise CaseTimeout(f"no answer within {CASE_TIMEOUT} s")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # what Python prints for a warning nobody catches: it would land on the user's stderr
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def invoke(args: list[str]):
    """Run the CLI in-process: CliRunner keeps stdout and stderr apart and records any exception
    that escapes the command (anything but SystemExit would be a traceback for a user). Warnings
    are shown as a plain `python -m onnx_lowrank` would (pytest would otherwise collect them)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.simplefilter("default", UserWarning)
            warnings.showwarning = _show_warning
            return CliRunner().invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed): kind and, for files, the sha256 of the bytes."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                entries[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(mode):
                entries[rel] = ("dir",)
            elif stat.S_ISREG(mode):
                entries[rel] = ("file", _sha256(path))
            else:
                entries[rel] = ("other", stat.S_IFMT(mode))
    return entries


def _escaped(result) -> str | None:
    """The exception that escaped the command, with where it was raised (the deepest frame in
    onnx_lowrank, else the deepest frame)."""
    e = result.exception
    if e is None or isinstance(e, SystemExit):
        return None
    frames = traceback.extract_tb(result.exc_info[2]) if result.exc_info else []
    ours = [f for f in frames if f"{os.sep}onnx_lowrank{os.sep}" in f.filename]
    where = (ours or frames)[-1] if (ours or frames) else None
    at = f" at {Path(where.filename).name}:{where.lineno} in {where.name}" if where else ""
    return f"{type(e).__module__}.{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{at}"


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    x, _ = calib_arrays()
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 3 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if tuple(dims[1:]) == (1, 28, 28):
            feeds[inp.name] = x[: dims[0]].astype(dtype)
        else:
            feeds[inp.name] = np.random.default_rng(0).standard_normal(dims).astype(dtype)
    return feeds


def valid_model_problem(path: Path) -> str | None:
    """None if `path` holds a model that passes onnx's full check and runs in onnxruntime."""
    if not path.is_file():
        return f"exit 0 but OUT {path} is not a file"
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, _feeds(model))
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"exit 0 but OUT is not a valid model: {type(e).__name__}: {first[:300]}"
    return None


def _relative(path: Path | None, root: Path) -> str | None:
    """`path` (absolute, symlinks not resolved: a write replaces the link) as a snapshot key."""
    if path is None:
        return None
    path = Path(os.path.abspath(path))
    return str(path.relative_to(root)) if path.is_relative_to(root) else None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_malformed_input(case: Case, tmp_path, monkeypatch, capfd):
    root = tmp_path / "case"
    root.mkdir()
    monkeypatch.chdir(root)  # relative paths in a case are relative to its folder
    ctx = Ctx(root, case.base)
    args = case.setup(ctx)
    before = snapshot(tmp_path)  # tmp_path, not root: a temporary file next to root counts too
    capfd.readouterr()

    try:
        result = invoke(args)
    except CaseTimeout as e:
        pytest.fail(f"[{case.id}] hung: {e}")
    # the runner swaps sys.stdout/sys.stderr; native code (onnxruntime's logger) writes to the
    # process's file descriptors, which a user sees on the terminal just the same
    fd_out, fd_err = capfd.readouterr()
    after = snapshot(tmp_path)
    stdout, stderr = result.stdout + fd_out, result.stderr + fd_err
    lines = [line for line in stderr.splitlines() if line.strip()]

    problems = []
    escaped = _escaped(result)
    if escaped:
        problems.append(f"exception escaped the CLI (a traceback): {escaped}")
    if "Traceback" in stdout or "Traceback" in stderr:
        problems.append("'Traceback' printed")

    out_rel, report_rel = (_relative(p, tmp_path) for p in (ctx.out, ctx.report))

    if result.exit_code == 0:
        if case.expect == "error":
            problems.append("exit 0, but this input must be refused")
        problem = valid_model_problem(ctx.out)
        if problem:
            problems.append(problem)
        # the files that were there are unchanged (OUT may replace an earlier file of that name,
        # unless that file is one of the inputs, which the expectation of the case says)
        changed = sorted(k for k, v in before.items() if k != out_rel and after.get(k) != v)
        if changed:
            problems.append(f"input files changed or removed: {changed}")
        new = sorted(set(after) - set(before) - {out_rel, report_rel})
        if new:
            problems.append(f"files left besides OUT: {new}")
    else:
        if case.expect == "ok":
            problems.append(f"exit {result.exit_code}, but this input is valid and must convert")
        if case.usage and "Usage:" in stderr:
            # a value of the wrong type (--eps abc) or an unknown option is refused by click while
            # parsing, before the converter runs: the usage block and an error box are the
            # convention every click/argparse tool follows, so only a non-zero exit (this branch),
            # no traceback and nothing written are required
            pass
        elif len(lines) != 1 or not lines[0].startswith("error:"):
            native = sum(1 for line in fd_err.splitlines() if line.strip())
            problems.append(f"stderr is not one 'error:' line ({len(lines)} non-empty lines"
                            + (f", {native} of them from native code, e.g. onnxruntime's logger)" if native else ")"))
        new = sorted(set(after) - set(before))
        if new:
            problems.append(f"files left behind: {new}")
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
        if changed:
            problems.append(f"files changed or removed: {changed}")

    assert not problems, (f"[{case.id}] exit {result.exit_code}: " + "; ".join(problems)
                          + f"\n  stderr: {stderr[-1500:]!r}\n  stdout tail: {stdout[-300:]!r}")
