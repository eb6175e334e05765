"""The command line: a thin typer layer over the package. Errors the converter raises on purpose
print one line and exit with status 2; nothing else is caught."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .decompositions import METHODS, reason_not_applicable
from .errors import OnnxLowrankError
from .graph import find_targets, load_model, prepare

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Low-rank compression of ONNX models.")
console = Console()


def fail(error: Exception) -> None:
    # plain echo: rich would wrap a long path over several lines and read [..] in it as markup
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"onnx-lowrank {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")) -> None:
    pass


@app.command()
def inspect(model: Path = typer.Argument(..., help="The ONNX model to look at.")) -> None:
    """List every Conv/Gemm/MatMul: its size, which decompositions apply, or why it is skipped.
    Writes nothing."""
    try:
        prepared = prepare(load_model(model))
    except OnnxLowrankError as e:
        fail(e)
    targets, skipped = find_targets(prepared)
    table = Table(title=f"{model.name}: {len(targets)} targets, {len(skipped)} skipped")
    for col in ("node", "op", "weight", "params", "MACs", "methods / reason"):
        table.add_column(col, overflow="fold")
    for t in targets:
        methods = [m for m in METHODS if not reason_not_applicable(t.layer, m)]
        macs = t.macs()
        shape = "x".join(map(str, t.layer.weight.shape)) + (f" g{t.layer.groups}" if t.layer.groups > 1 else "")
        # a target no method applies to (a depthwise conv) says why through svd, which takes any layer
        text = ", ".join(methods) if methods else "skipped: " + reason_not_applicable(t.layer, "svd")
        table.add_row(t.name, t.op_type, shape, f"{t.layer.params:,}", "?" if macs is None else f"{macs:,}", text)
    for s in skipped:
        table.add_row(s.name, s.op_type, "", "", "", f"skipped: {s.reason}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(app())
