"""The command line: a thin typer layer over the package. Errors the converter raises on purpose
print one line and exit with status 2; an unexpected exception (a bug) prints one line and exits 3."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .calibration.data import ImageOptions
from .config import CompressConfig, EPS_HELP
from .decompositions import METHODS
from .errors import OnnxLowrankError, first_line
from .graph import find_targets, load_model, prepare
from .pipeline.report import Report

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Low-rank compression of ONNX models.")
# piped or in `make`, rich would assume 80 columns and fold the tables beyond reading
console = Console() if sys.stdout.isatty() else Console(width=150)


def fail(error: Exception) -> None:
    # plain echo: rich would wrap a long path over several lines and read [..] in it as markup
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _require_matplotlib() -> None:
    # checked before the work, so that a missing package does not cost a finished conversion
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OnnxLowrankError("--plots needs matplotlib: pip install 'onnx-lowrank[plots]'")


def _version(value: bool) -> None:
    if value:
        console.print(f"onnx-lowrank {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")) -> None:
    import onnxruntime

    # onnxruntime logs a model it refuses as its own coloured line on stderr; we report every
    # error once, in our line
    onnxruntime.set_default_logger_severity(4)


@app.command()
def inspect(model: Path = typer.Argument(..., help="The ONNX model to look at."),
            calib: Optional[Path] = typer.Option(None, help="Calibration inputs (as for convert): the "
                                                 "compressibility columns then measure output errors on them."),
            batch_size: int = typer.Option(64, help="Batch size of the onnxruntime runs.")) -> None:
    """List every Conv/Gemm/MatMul: its size, which decompositions apply or why it is skipped,
    and how far it compresses: the smallest share of its MACs at which some method keeps its
    error within 10% and 30%. Writes nothing."""
    from .tools.inspection import compressibility

    try:
        prepared = prepare(load_model(model))
        targets, skipped = find_targets(prepared)
        rows, how = compressibility(prepared, targets, str(calib) if calib else None, batch_size)
    except (OnnxLowrankError, ValueError) as e:
        fail(e)
    measured = "output error on --calib" if calib else "weight error (no --calib)"
    table = Table(title=f"{model.name}: {len(targets)} targets, {len(skipped)} skipped", caption=f"share of the "
                  f"layer's MACs needed for an error within 10% / 30%, by {measured}")
    for col in ("node", "op", "weight", "params", "MACs", "err<=0.1", "err<=0.3", "methods / reason"):
        table.add_column(col, overflow="fold")
    for t, row in zip(targets, rows):
        shape = "x".join(map(str, t.layer.weight.shape)) + (f" g{t.layer.groups}" if t.layer.groups > 1 else "")
        table.add_row(t.name, t.op_type, shape, f"{t.layer.params:,}", f"{row.macs:,}" if row.macs else "?",
                      row.at_10, row.at_30, ", ".join(row.methods) if row.methods else f"skipped: {row.reason}")
    for s in skipped:
        table.add_row(s.name, s.op_type, "", "", "", "", "", f"skipped: {s.reason}")
    console.print(table)
    console.print(Report(0, "", "", "", False, how, memory=how.get("memory", {})).how_run(), highlight=False,
                  markup=False)


@app.command("bench")
def bench_command(
    original: Path = typer.Argument(..., help="The original model."),
    compressed: list[Path] = typer.Argument(..., help="The compressed model(s), each against the original (a "
                                            "float and an int8 result side by side, say)."),
    provider: str = typer.Option("CPUExecutionProvider", help="onnxruntime execution provider."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes to time, e.g. 1,32."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads (0: its default)."),
    calib: Optional[Path] = typer.Option(None, help="Inputs (as for convert): the timing feeds, and the quality "
                                         "drop of each compressed model on all of them."),
    labels: Optional[str] = typer.Option(None, help="Labels (as for convert): the drop is then in accuracy."),
    seconds: float = typer.Option(1.0, help="Time each batch size for at least this long."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Parameters, MACs, file size, onnxruntime latency (median/min/max, the models run in turn)
    and, with --calib, the quality drop of each COMPRESSED against ORIGINAL."""
    import json

    from .tools.bench import bench
    from .runtime.sessions import require_provider

    try:
        batches = tuple(int(b) for b in batch.split(","))
        if not batches or min(batches) < 1:
            raise ValueError(f"--batch takes positive integers; got {batch!r}")
        require_provider(provider)
        result = bench(original, *compressed, batches=batches, provider=provider, threads=threads,
                       calibration=str(calib) if calib else None, labels=labels, min_seconds=seconds)
    except (OnnxLowrankError, ValueError) as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    names = [Path(p).name for p in result.models]
    sizes = Table(title=" vs ".join(names))
    sizes.add_column("")
    for name in names:
        sizes.add_column(name, justify="right")
    for label, values, unit in (("parameters", result.params, ""), ("MACs / sample", result.macs, ""),
                                ("file size", result.file_size, " B")):
        sizes.add_row(label, f"{values[0]:,}{unit}", *(f"{v:,}{unit} ({values[0] / max(v, 1):.2f}x)" for v in values[1:]))
    if result.drop is not None:
        sizes.add_row(f"{result.metric} ({result.samples} samples)", f"{result.quality[0]:.4f}",
                      *(f"{q:.4f} (drop {d:.4f})" for q, d in zip(result.quality[1:], result.drop)))
    console.print(sizes)
    times = Table(title=f"latency, {provider}, threads {threads or 'default'}: ms per run, median (min - max)")
    for col in ("batch", *names, "runs"):
        times.add_column(col, justify="right")
    for lat in result.latency:
        cells = [f"{1e3 * m:.3f} ({1e3 * lo:.3f} - {1e3 * hi:.3f})" for m, lo, hi in zip(lat.median, lat.min, lat.max)]
        cells[1:] = [f"{c}, speedup {s:.2f}x" for c, s in zip(cells[1:], lat.speedup)]
        times.add_row(str(lat.batch), *cells, str(lat.runs))
    console.print(times)


@contextmanager
def _progress() -> Iterator:
    """A rich progress bar per pipeline stage, on stderr so stdout stays the table."""
    from .bridge.finetune import process_rank

    with Progress(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.completed} done"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                  disable=process_rank() != 0) as bars:  # under torchrun, rank 0's bars only
        def stage(name: str, total: int):
            task = bars.add_task(name, total=total)
            return lambda: bars.advance(task)
        yield stage


def _floats(option: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}") from None


def _bytes(option: str, text: str) -> int:
    """'12G', '512M', '6000000000' -> bytes (K, M, G, T: powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[:len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ValueError(f"{option} takes a size such as 12G or 512M; got {text!r}") from None


def _split(values: Optional[list[str]]) -> tuple[str, ...]:
    return tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The ONNX model to compress (never modified)."),
    dst: Path = typer.Argument(..., help="Where to write the compressed model (written atomically)."),
    eps: float = typer.Option(0.005, help=EPS_HELP),
    calib: Optional[Path] = typer.Option(None, help="Calibration inputs: .npz keyed by input name, .npy "
                                         "(single input) or a folder of images. Without it: synthetic inputs."),
    labels: Optional[str] = typer.Option(None, help="Labels: an .npy file, or the name of a key in the --calib "
                                         ".npz. Enables --metric accuracy."),
    metric: str = typer.Option("auto", help="What --eps bounds. auto: accuracy with --labels, agreement for a "
                               "classifier of 3 or more classes whose top-1 varies, else r2. accuracy: top-1 "
                               "accuracy drop. agreement: share of samples whose top-1 changes. r2: 1 - R^2 per "
                               "output channel, averaged, each channel on its own scale (the worst output "
                               "counts). cosine: 1 - mean cosine similarity per sample (a part of the output that "
                               "is large or constant can hide damage to the rest). module:function or "
                               "path.py:function: your own, fn(reference, outputs[, indices]) -> drop."),
    select: str = typer.Option("auto", help="auto | cosine | hessian | energy | vbmf | rank: how ranks are chosen."),
    rank: Optional[int] = typer.Option(None, help="--select rank: cap every rank of every layer at R."),
    ratio: Optional[float] = typer.Option(None, help="--select rank: each layer at this fraction of its cost."),
    energy: Optional[float] = typer.Option(None, help="--select energy: output energy each layer keeps."),
    methods: str = typer.Option("auto", help=f"Comma-separated decompositions ({', '.join(METHODS)}) or auto."),
    cost: str = typer.Option("macs", help="macs | params | latency: what the search minimises. latency: each "
                             "candidate timed in onnxruntime at the layer's real input shape, quantized with "
                             "--quantize (cached on disk); no layer is replaced by a slower chain."),
    rank_multiple: Optional[int] = typer.Option(None, help="Round ranks to multiples of N. Default: the block of "
                                                "channels onnxruntime's convs run in on this machine (measured "
                                                "once at --provider/--threads and cached: 16 with AVX-512), so "
                                                "the model is fast, not only small; 8 with --quantize int8; 1 "
                                                "with --cost params."),
    provider: str = typer.Option("CPUExecutionProvider", help="--cost latency and the rank widths: the "
                                 "execution provider timed."),
    threads: int = typer.Option(0, help="--cost latency and the rank widths: onnxruntime threads (0: its "
                                "default)."),
    latency_batch: int = typer.Option(1, help="--cost latency: the batch size layers are timed at."),
    exclude: Optional[list[str]] = typer.Option(None, help="Node names or op types to leave alone (repeatable, "
                                                "comma-separated)."),
    report: Optional[Path] = typer.Option(None, help="Write the report as JSON here."),
    plots: Optional[Path] = typer.Option(None, help="Write the report's plots (PNG) into this folder."),
    merge: bool = typer.Option(True, help="Merge adjacent linear layers (1x1 convs, Gemm/MatMul) where one costs "
                               "fewer MACs than two."),
    quantize: Optional[str] = typer.Option(None, help="int8: quantize the result with onnxruntime's quantizer too "
                                           "(static QDQ per channel for conv models, dynamic for MatMul-heavy "
                                           "ones); --eps then bounds the quantized model's drop, and layers whose "
                                           "quantization costs most are kept in float."),
    fp16: bool = typer.Option(False, "--fp16", help="Store weights in float16 (half the file; compute stays "
                              "float32, so it runs everywhere). Verified like the rest."),
    optimize: bool = typer.Option(False, "--optimize", help="Write onnxruntime's offline-optimized graph (basic "
                                  "level: constant folding, redundant nodes; portable)."),
    jobs: int = typer.Option(1, help="Layers decomposed at once, in threads (0: one per CPU)."),
    finetune_epochs: int = typer.Option(0, help="Fine-tune through PyTorch (distillation from IN, plus --labels) "
                                        "for this many epochs on the search part, compress further while the "
                                        "fine-tuned model stays within eps, raise the ranks of the least similar "
                                        "layers on a miss (Kokhazadeh et al.'s loop; needs the torch extra)."),
    finetune_lr: float = typer.Option(3e-3, help="Learning rate for --finetune-epochs (SGD, momentum 0.9); an "
                                      "epoch that raises the loss runs again at a tenth of it (3 times at most)."),
    iterative: bool = typer.Option(False, "--iterative", help="With --finetune-epochs: factor the chosen layers one "
                                   "at a time, most sensitive (Hessian trace) first, each from the weights fine-tuned "
                                   "so far, with --finetune-epochs epochs after each (Yang & Liu's iterative mode)."),
    seed: int = typer.Option(0, help="Seed for the calibration split, sampling and ALS."),
    no_data_aware: bool = typer.Option(False, "--no-data-aware", help="Plain factors: do not whiten by the input "
                                       "covariance."),
    no_compensate: bool = typer.Option(False, "--no-compensate", help="Keep the factors as decomposed: do not refit "
                                       "each factored layer's last step by least squares to the original layer's "
                                       "outputs, given the compressed model's own inputs on the calibration data "
                                       "(measured on two halves, each refit on the other)."),
    holdout: float = typer.Option(0.8, help="Share of the calibration set held out of every fit and every choice: "
                                  "it alone decides what is written (--confidence)."),
    confidence: float = typer.Option(0.9, help="The level of the upper confidence bound on the drop for new data "
                                     "(one-sided) that must be within --eps, measured on the held-out part."),
    groups: Optional[str] = typer.Option(None, help="Each calibration sample's source (photo, file, speaker, "
                                         "document): an .npy file, or the name of a key in the --calib .npz. Every "
                                         "split keeps a group on one side; without, samples are taken as "
                                         "independent."),
    verify: bool = typer.Option(True, help="Decide on the held-out part: step back where the drop's bound exceeds "
                                "eps, fail (nothing written) if it still does or if outputs are NaN/Inf. "
                                "--no-verify reports it and writes the model anyway."),
    batch_size: int = typer.Option(64, help="Batch size of the onnxruntime runs (at most; --max-memory may run "
                                   "fewer, a model with a fixed batch runs in its own)."),
    max_memory: str = typer.Option("12G", help="Memory the conversion plans for (K, M, G): onnxruntime batches, "
                                   "the layers' input statistics and factors are sized to it, and what does "
                                   "not fit is one error line, not a kill. The default fits a 16 GB machine."),
    image_size: Optional[int] = typer.Option(None, help="Images: side of the centre crop (default: the model's)."),
    image_mean: str = typer.Option("0.485,0.456,0.406", help="Images: per-channel mean after scaling."),
    image_std: str = typer.Option("0.229,0.224,0.225", help="Images: per-channel std after scaling."),
    image_layout: str = typer.Option("NCHW", help="Images: NCHW or NHWC."),
    image_scale: float = typer.Option(1 / 255, help="Images: factor from pixel values to the model's range."),
) -> None:
    """Compress IN into OUT: every Conv/Gemm/MatMul factored, ranks chosen so that the quality drop
    stays within --eps."""
    try:
        from .bridge.finetune import process_rank
        from .pipeline import compress_file

        config = CompressConfig(
            eps=eps, metric=metric, select=select, rank=rank, ratio=ratio, energy=energy,
            methods=None if methods.strip() == "auto" else _split([methods]), cost=cost, exclude=_split(exclude),
            rank_multiple=rank_multiple, provider=provider, threads=threads, latency_batch=latency_batch,
            merge=merge, quantize=quantize, fp16=fp16, optimize=optimize, jobs=jobs, verify=verify,
            finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, iterative=iterative,
            data_aware=not no_data_aware, compensate=not no_compensate, holdout=holdout, confidence=confidence,
            seed=seed,
            batch_size=batch_size, max_memory=_bytes("--max-memory", max_memory),
            image=ImageOptions(size=image_size, mean=_floats("--image-mean", image_mean),
                               std=_floats("--image-std", image_std), layout=image_layout,
                               scale=image_scale))
        config.validate()
        if plots is not None:
            _require_matplotlib()
        with warnings.catch_warnings(record=True) as caught, _progress() as stage:
            warnings.simplefilter("always", UserWarning)
            result = compress_file(src, dst, config, str(calib) if calib else None, labels, report, stage, plots,
                                   groups)
        if process_rank() != 0:  # under torchrun: rank 0 writes and speaks for all
            return
        for w in caught:
            if issubclass(w.category, UserWarning):
                typer.secho(f"warning: {w.message}", err=True, fg="yellow", bold=True)
    except (OnnxLowrankError, ValueError) as e:
        fail(e)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    for table in result.tables():
        console.print(table)
    if plots is not None:
        console.print(f"plots: {plots}/trade_off.png, {plots}/layers.png", highlight=False)
    console.print(f"wrote {dst}: {result.mac_ratio:.2f}x fewer MACs, {result.param_ratio:.2f}x fewer parameters; "
                  f"{result.promise()}", highlight=False)


@app.command("finetune")
def finetune_command(
    student: Path = typer.Argument(..., help="The compressed model to fine-tune (never modified)."),
    dst: Path = typer.Argument(..., help="Where to write the fine-tuned model (written atomically)."),
    teacher: Path = typer.Option(..., help="The original model: the outputs the student learns to give."),
    calib: Path = typer.Option(..., help="Training inputs (as for convert); --holdout of them measure the result."),
    labels: Optional[str] = typer.Option(None, help="Labels (as for convert): cross-entropy is then mixed in."),
    epochs: int = typer.Option(3, help="Passes over the training part."),
    lr: float = typer.Option(3e-3, help="Learning rate (SGD with momentum 0.9); an epoch that raises the loss "
                             "runs again at a tenth of it (3 times at most)."),
    batch_size: int = typer.Option(64, help="Samples per step (per process under torchrun)."),
    device: str = typer.Option("cpu", help="torch device: cpu, cuda, cuda:1, ..."),
    holdout: float = typer.Option(0.3, help="Share of --calib kept out of training to measure the result."),
    seed: int = typer.Option(0, help="Seed of the split, the shuffling and the initial state."),
) -> None:
    """Fine-tune a compressed model through PyTorch: distillation from --teacher (KL on logits,
    MSE on other outputs; no labels needed), plus cross-entropy with --labels. Runs unchanged
    under torchrun --nproc_per_node N (DistributedDataParallel); only rank 0 writes."""
    from .bridge.finetune import FinetuneOptions, process_rank
    from .pipeline import finetune_file

    try:
        options = FinetuneOptions(epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed)
        result = finetune_file(student, dst, teacher, str(calib), labels, options, holdout, seed)
    except (OnnxLowrankError, ValueError) as e:
        fail(e)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    if process_rank() == 0:
        losses = ", ".join(f"{loss:.4f}" for loss in result.losses) or "none"
        rate = "" if result.lr == lr else f" (an epoch raised the loss: backed off to lr {result.lr:g})"
        stop = "; stopped early: no rate lowered the loss" if result.stopped else ""
        console.print(f"wrote {dst}: held-out {result.metric} {result.quality_before:.4f} -> {result.quality_after:.4f} "
                      f"(teacher {result.teacher_quality:.4f}); loss per epoch {losses}{rate}{stop}; "
                      f"{result.processes} process(es); export parity {result.parity:.1e}", highlight=False)


def run() -> None:
    """The console script. Errors we foresee are reported where they happen; anything else is a bug
    of ours, and a deployment pipeline still gets one line and a non-zero exit, not a traceback
    (ONNX_LOWRANK_DEBUG=1 shows it)."""
    try:
        app()
    except Exception as e:
        if os.environ.get("ONNX_LOWRANK_DEBUG"):
            raise
        typer.echo(f"error: internal error ({type(e).__name__}: {first_line(e)}); please report this bug, with the traceback "
                   "ONNX_LOWRANK_DEBUG=1 shows", err=True)
        sys.exit(3)


if __name__ == "__main__":
    run()
