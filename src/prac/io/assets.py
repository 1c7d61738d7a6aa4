"""Paths of what ships inside the package: the tiny demo models and their text."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent / "assets"

DEFAULT_MODEL = _ROOT / "tiny-mistral"
#: A small Mixtral-architecture model (8 experts, top-2) trained on the same text with the same
#: tokenizer (``tools/train_moe_fixture.py``): the MoE fixture of ``bench/moe_quality.py``.
MOE_MODEL = _ROOT / "tiny-mixtral"
BUNDLED_MODELS = (DEFAULT_MODEL, MOE_MODEL)
DEFAULT_CALIB = _ROOT / "pystdlib" / "calib.txt"
DEFAULT_EVAL = _ROOT / "pystdlib" / "eval.txt"
# The bundled model was trained on 256-token windows; its golden numbers use that length.
DEFAULT_MODEL_SEQLEN = 256


def is_default_model(path: str | Path) -> bool:
    """Whether ``path`` is one of the bundled models (their text and 256-token windows are its defaults)."""
    try:
        return Path(path).resolve() in BUNDLED_MODELS
    except OSError:
        return False
