"""The layering contract (pyproject.toml, [tool.importlinter]) holds for the tree, and an upward import
breaks it: ``lint-imports`` is what CI runs, so the contract must be able to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="pip install -e '.[lint]'")


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cli = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    return subprocess.run([*cli, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_layers_and_an_upward_import_breaks_them(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "prac", src / "prac", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    assert lint_imports(src).returncode == 0, lint_imports(src).stdout[-2000:]

    # core is the bottom layer: importing the engine from it is the kind of shortcut the contract forbids
    errors = src / "prac" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _shortcut():\n    from prac.engine.loop import BlockEngine\n\n"
                      "    return BlockEngine\n")
    broken = lint_imports(src)
    assert broken.returncode != 0
    assert "prac.core is not allowed to import prac.engine" in broken.stdout
    assert "prac.core.errors -> prac.engine.loop" in broken.stdout
