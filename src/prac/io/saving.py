"""Writing the pruned model: ``save_pretrained`` into a staged folder (see :mod:`prac.io.outputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prac.io.outputs import REPORT_NAME, StagedDir, dump_json
from prac.io.source_files import copy_source_files


def stage_model(model, tokenizer, out_dir: str | Path, report: dict[str, Any], compressed: tuple | None = None,
                source: str | None = None) -> StagedDir:
    """Model (safetensors), tokenizer and ``prac_report.json`` in a temporary sibling of ``out_dir``.

    The report lists every file of the folder (``saved_files``): that list is what a later
    ``--overwrite`` may replace; ``report["saved"]`` is set to the format and the bytes of the weight
    files. ``compressed``: ``(grids, QuantConfig)`` of a quantized prune, to write compressed-tensors'
    pack-quantized format (:mod:`prac.quant.formats.compressed`; the model is compressed in place). ``source``: the
    model folder or hub id pruned, whose other files and model card are carried over
    (:mod:`prac.io.source_files`). Nothing is visible at ``out_dir`` until the caller commits.
    """
    from prac.quant.formats.compressed import FORMAT, to_compressed, weight_bytes

    def fill(tmp: Path) -> None:
        compressor = to_compressed(model, *compressed) if compressed is not None else None
        model.save_pretrained(tmp, safe_serialization=True)
        if compressor is not None:
            compressor.update_config(str(tmp))
        report["saved"] = {"format": f"compressed-tensors {FORMAT}" if compressor is not None else "dense",
                           "weight_bytes": weight_bytes(tmp)}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_source_files(source, tmp, report)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [REPORT_NAME]
        (tmp / REPORT_NAME).write_text(dump_json({**report, "saved_files": sorted(files)}), encoding="utf-8")
        from prac.io.outputs import file_mode

        for p in tmp.rglob("*"):
            if p.is_file():
                p.chmod(file_mode())

    return StagedDir(out_dir, fill)
