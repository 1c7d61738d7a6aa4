"""Writing the pruned model: checked before any work, written atomically, never into the source."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from prac.errors import PracError
from prac.report import write_json_atomic


def check_output_dir(out_dir: str | Path, source: str | Path, overwrite: bool) -> Path:
    """Refuse the source model's folder (or a folder inside/around it) and non-empty folders."""
    out = Path(out_dir).expanduser().resolve()
    src = Path(source).expanduser()
    if src.exists():
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise PracError(f"output folder {str(out_dir)!r} would overwrite the source model at {str(src)!r}")
    if out.exists() and not out.is_dir():
        raise PracError(f"output path {str(out_dir)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PracError(f"output folder {str(out_dir)!r} is not empty (use --overwrite to replace it)")
    return out


def save_model(model, tokenizer, out_dir: str | Path, source: str | Path, report: dict[str, Any], overwrite: bool) -> Path:
    """``save_pretrained`` + tokenizer + ``prac_report.json`` into a temporary sibling, then rename."""
    out = check_output_dir(out_dir, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "prac_report.json", report)
        if out.exists():
            backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            backup.rmdir()
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
