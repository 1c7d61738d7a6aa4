"""Paths of what ships inside the package: the tiny demo model and its text."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent / "assets"

DEFAULT_MODEL = _ROOT / "tiny-mistral"
DEFAULT_CALIB = _ROOT / "pystdlib" / "calib.txt"
DEFAULT_EVAL = _ROOT / "pystdlib" / "eval.txt"
# The bundled model was trained on 256-token windows; its golden numbers use that length.
DEFAULT_MODEL_SEQLEN = 256


def is_default_model(path: str | Path) -> bool:
    try:
        return Path(path).resolve() == DEFAULT_MODEL
    except OSError:
        return False
