"""What a saved folder keeps of its source: every file ``save_pretrained`` did not write, and a model card.

A model folder often holds more than config, weights and tokenizer: a model card (``README.md``),
sentence-transformers' ``modules.json``, ``config_sentence_transformers.json`` and module folders
(``1_Pooling/config.json``), a ``generation_config.json`` of its own. Without them the pruned
all-MiniLM-L6-v2 loads in ``SentenceTransformer`` without its pooling and normalisation. So
:func:`copy_source_files` copies them into the folder being saved, with these rules:

- a file prac already wrote there is never replaced (prac's config and tokenizer win);
- the source's weights are never copied: files ending in a weight suffix (:data:`WEIGHT_SUFFIXES`),
  the index of sharded weights (``*.index.json``), and any sub-folder holding a weight file (another
  export of the dense weights, e.g. ``onnx/``, ``openvino/``);
- hidden entries (``.git``, ``.cache``) and ``prac_report.json`` are skipped;
- the model card says the model was pruned, and with what (:func:`card_section`): inserted under the
  source card's title (after its YAML front matter), or replacing the section a previous prac save
  put there; a source without a card gets a small one.

A hub id is read from the hub's cache (the files are downloaded when the hub can be reached, weights
excluded); when that fails the folder gets prac's own card and a warning, never a failed save.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from prac.io.outputs import REPORT_NAME

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                   ".onnx_data", ".ot", ".tflite", ".npz")
CARD = "README.md"
BEGIN, END = "<!-- prac:begin -->", "<!-- prac:end -->"
_FRONT_MATTER = re.compile(r"\A---\r?\n.*?\r?\n---[ \t]*\r?\n", re.DOTALL)
_TITLE = re.compile(r"\s*# [^\n]*\n")  # the card's first line, when it is a level-1 heading


def is_weight_file(name: str) -> bool:
    """A file of the source's weights (never carried into a pruned folder)."""
    lower = name.lower()
    return lower.endswith(WEIGHT_SUFFIXES) or lower.endswith(".index.json")


def source_folder(path_or_id: str | None) -> Path | None:
    """The local folder holding the source's files: the folder itself, or a hub id's snapshot (the
    files :func:`carried` keeps, fetched when the hub can be reached, else those in its cache); None
    when there is none."""
    if not path_or_id:
        return None
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.is_file():  # a single-file model (GGUF): nothing else to carry, and not a hub id
        return None
    from prac.model.loading import hub_offline_reason

    try:
        from huggingface_hub import list_repo_files, snapshot_download

        if hub_offline_reason() is not None:
            return Path(snapshot_download(path_or_id, local_files_only=True))
        wanted = [p.as_posix() for p in carried([Path(f) for f in list_repo_files(path_or_id)])]
        return Path(snapshot_download(path_or_id, allow_patterns=wanted or ["README.md"]))
    except Exception as exc:  # noqa: BLE001 - the save goes on without the source's files
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        log.warning("the other files of %s (model card, modules.json, ...) could not be fetched: %s; the saved "
                    "folder gets prac's own model card", path_or_id, message)
        return None


def carried(files: list[Path]) -> list[Path]:
    """Of a model folder's files (relative paths), those a pruned copy carries over: not hidden, not
    ``prac_report.json``, not a weight file, not inside a sub-folder that holds a weight file."""
    files = [rel for rel in files if not any(part.startswith(".") for part in rel.parts)]
    heavy = {parent for rel in files if is_weight_file(rel.name) for parent in rel.parents if parent != Path(".")}
    return [rel for rel in files if rel.as_posix() != REPORT_NAME and not is_weight_file(rel.name)
            and not any(parent in heavy for parent in rel.parents)]


def source_files(folder: Path) -> list[Path]:
    """The files of ``folder`` to carry over (relative paths, :func:`carried`)."""
    return carried([p.relative_to(folder) for p in sorted(folder.rglob("*")) if p.is_file()])


def copy_source_files(source: str | None, dest: Path, report: dict[str, Any]) -> list[str]:
    """Copy the source's other files into ``dest`` (never over a file already there) and write the
    model card; returns the copied paths (relative, POSIX), the card included. No ``source``: nothing."""
    if source is None:
        return []
    folder = source_folder(source)
    copied: list[str] = []
    if folder is not None:
        for rel in source_files(folder):
            target = dest / rel
            if target.exists() or rel.as_posix() == CARD:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, target)  # follows the hub cache's symlinks
            copied.append(rel.as_posix())
    card = dest / CARD
    if not card.exists():
        original = folder / CARD if folder is not None else None
        text = original.read_text(encoding="utf-8", errors="replace") if original and original.is_file() else None
        card.write_text(model_card(text, report), encoding="utf-8")
        copied.append(CARD)
    return sorted(copied)


def model_card(original: str | None, report: dict[str, Any]) -> str:
    """``original`` (the source's card) with prac's section after its YAML front matter (replacing the
    section of an earlier prac save), or a small card of its own when there is none."""
    section = f"{BEGIN}\n{card_section(report)}\n{END}\n"
    if original is None or not original.strip():
        config = report.get("config") or {}
        return f"# {Path(str(config.get('model', 'model'))).name} (pruned)\n\n{section}"
    if BEGIN in original and END in original:
        head, rest = original.split(BEGIN, 1)
        return head + section.rstrip("\n") + rest.split(END, 1)[1]
    match = _FRONT_MATTER.match(original)
    cut = match.end() if match else 0
    title = _TITLE.match(original, cut)
    if title:  # under the card's title, above its text
        return original[:title.end()] + "\n" + section + "\n" + original[title.end():].lstrip("\r\n")
    return original[:cut] + ("\n" if cut else "") + section + "\n" + original[cut:]


def card_section(report: dict[str, Any]) -> str:
    """The card's Markdown section: what was pruned, how, and the evaluation when there was one."""
    config = report.get("config") or {}
    prune = config.get("prune") or {}
    lines = ["## Pruned with prac", "",
             f"These weights are `{config.get('model')}` pruned by prac; `prac_report.json` holds the whole "
             f"record.", "",
             f"- method: {prune.get('method')}, {_pattern(prune.get('pattern') or {})}"]
    allocation = (config.get("allocation") or {}).get("method")
    if allocation and allocation != "uniform":
        lines.append(f"- per-layer sparsities: {allocation} allocation at that total")
    correction = (prune.get("correction") or {}).get("method")
    if correction and correction != "none":
        lines.append(f"- correction: {correction}")
    quant = prune.get("quant") or {}
    if quant.get("bits"):
        groups = "per channel" if quant.get("group_size") == -1 else f"groups of {quant.get('group_size')}"
        grid = "symmetric" if quant.get("symmetric") else "asymmetric"
        lines.append(f"- quantized: {quant['bits']}-bit, {groups}, {grid}")
    reconstruct = ((prune.get("engine") or {}).get("reconstruct") or {}).get("mode")
    if reconstruct and reconstruct != "none":
        lines.append(f"- reconstruction: {reconstruct}")
    calib = config.get("calibration") or {}
    if calib:
        what = calib.get("file") or calib.get("source")
        lines.append(f"- calibration: {calib.get('nsamples')} x {calib.get('seqlen')} tokens of {what}")
    summary = report.get("summary") or {}
    evaluation = str(config.get("eval") or "").split(",")[0]
    if summary.get("ppl") is not None:
        dense = f"dense {summary['dense_ppl']:.4f} -> " if summary.get("dense_ppl") is not None else ""
        lines.append(f"- perplexity on {evaluation}: {dense}pruned {summary['ppl']:.4f}")
    elif summary.get("cosine_similarity") is not None:
        lines.append(f"- cosine similarity of last hidden states to the dense model on {evaluation}: "
                     f"{summary['cosine_similarity']:.6f}")
    return "\n".join(lines)


def _pattern(pattern: dict[str, Any]) -> str:
    if pattern.get("type") == "nm":
        return f"{pattern.get('n')}:{pattern.get('m')} semi-structured sparsity"
    sparsity = pattern.get("sparsity")
    return f"{sparsity:.0%} unstructured sparsity" if isinstance(sparsity, (int, float)) else "unstructured sparsity"
