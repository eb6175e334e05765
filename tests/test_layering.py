"""The package's layering (pyproject.toml's import-linter contracts): each layer imports only
from the layers below it, the decompositions know nothing of ONNX, only the bridge imports torch."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the contracts name the package as the checkout holds it
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out
