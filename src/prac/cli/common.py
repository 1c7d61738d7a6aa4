"""Pieces every command shares: argument types, the common options, progress, number formatting.

Light on purpose: nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from prac.core.progress import Progress


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, described as ``what`` in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
positive_int.__doc__ = "argparse type: an integer >= 1."
non_negative_int = int_at_least(0, "an integer >= 0")


def sparsity(text: str) -> float:
    """argparse type: a sparsity in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return value


def add_logging_options(group: Any) -> None:
    """``--debug`` and ``-v``: what the ``prac`` logger shows (see :func:`prac.cli.configure_logging`)."""
    group.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logging of prac")
    group.add_argument("-v", "--verbose", action="store_true", help="show INFO logging of prac (what each phase did)")


def add_common(p: argparse.ArgumentParser) -> None:
    """Device, dtype, logging and progress options of ``prune`` and ``eval``."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:i (default: auto)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (as saved), float32, float16, bfloat16")
    add_logging_options(p)
    add_progress_option(p)


def add_progress_option(group: Any) -> None:
    """``--no-progress``, on every command: no bar of prac's, transformers', the hub's or lm-eval's."""
    group.add_argument("--no-progress", action="store_true",
                       help="hide progress bars (prac's, and those of transformers, the hub and lm-eval)")


def progress(args: argparse.Namespace) -> Progress:
    """The progress callable for the library: tqdm bars, or none with ``--no-progress``."""
    from prac.core.progress import no_progress, tqdm_progress

    if args.no_progress:
        quiet_libraries()
        return no_progress
    return tqdm_progress


def quiet_libraries() -> None:
    """--no-progress also hides transformers', the hub's and ``datasets``' own loading/writing bars
    (lm-eval's are hidden where it runs: :func:`prac.parallel.harness.run_tasks`)."""
    import os
    import sys

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported (it is, late, if at all)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def number(value: Any, spec: str = ".4f") -> str:
    """``value`` formatted with ``spec``; ``nan`` for None, NaN or Inf (a report may hold null)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan"
    return format(value, spec)


def not_finite(summary: dict[str, Any]) -> str | None:
    """The report's status when it says the result is not usable (anything but "ok"), else None."""
    status = summary.get("status")
    return None if status is None or status == "ok" else str(status)


def add_calibration(g, nsamples: int) -> None:
    """``--model`` and the calibration options shared by ``prune`` and ``verify``."""
    from prac.io import assets

    g.add_argument("--model", default=str(assets.DEFAULT_MODEL),
                   help="model folder or hub id (default: the bundled tiny Mistral)")
    g.add_argument("--calib", default=None,
                   help="c4 | wikitext2 | FILE.txt | FILE.jsonl (default: bundled text for the bundled model, else c4)")
    g.add_argument("--calib-tokens", default=None, metavar="FILE",
                   help="safetensors file with integer input_ids [n, seqlen]: use exactly these tokens")
    g.add_argument("--nsamples", type=positive_int, default=nsamples, help=f"calibration sequences (default: {nsamples})")
    g.add_argument("--seqlen", type=positive_int, default=None,
                   help="calibration length (default: 2048 capped at the model's context; 256 for the bundled model)")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and stored-token samples (default: 0)")
    add_bos_option(g, "calibration and evaluation windows")


BOS_HELP = ("{what}: always = the first token of every window is replaced by the tokenizer's BOS (windows stay "
            "--seqlen tokens, the same ones, predicting the same tokens); never = the windows as cut from the "
            "tokenized text, so only one that starts where the text starts has BOS (the papers' protocol); "
            "auto = always for the model families trained with BOS on every sequence (Gemma, Gemma 2, Gemma 3), "
            "never otherwise, or what a folder prac saved records (default: auto){tokens}")


def add_bos_option(g, what: str, tokens: bool = True) -> None:
    """``--bos auto|always|never`` (see :mod:`prac.io.data`)."""
    g.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help=BOS_HELP.format(what=what, tokens="; --calib-tokens files are used exactly as given"
                                        if tokens else ""))
