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


def test_the_old_flat_module_names_still_import_with_a_deprecation_warning():
    import importlib
    import warnings

    import prac.methods.sparsegpt as new

    for old, new_name in (("prac.sparsegpt", "prac.methods.sparsegpt"), ("prac.distributed", "prac.parallel.session"),
                          ("prac.quantize", "prac.quant.gptq")):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new_name)
        assert any(issubclass(w.category, DeprecationWarning) and new_name in str(w.message) for w in caught)
    assert importlib.import_module("prac.sparsegpt").SparseGPTConfig is new.SparseGPTConfig
    with pytest.warns(DeprecationWarning, match="prac.jobs.prune.run_prune"):
        from prac.jobs import run_prune
    from prac.jobs.prune import run_prune as moved

    assert run_prune is moved
    with pytest.warns(DeprecationWarning, match="prac.engine.loop.BlockEngine"):
        from prac.engine import BlockEngine  # noqa: F401
