"""What a job settles from its model before any work: the defaults that depend on the model folder, the
context checks (:func:`resolve`), the save format ``auto`` stands for, the windows' BOS and the
calibration tokens that follow from them.

Defaults that depend on the model (:func:`folder_defaults`): the bundled model, and any copy of it
(same ``config.json`` and byte-identical ``model.safetensors``), calibrate and evaluate on the bundled
text with 256-token windows; a folder prac saved reuses the protocol its ``prac_report.json``
records (calibration seqlen and text, evaluation text and seqlen); any other model gets 2048 capped
at its context, ``c4`` and no evaluation. The report's ``config.defaults_from`` says which applied.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from prac.core.errors import PracError
from prac.io import assets
from prac.io.data import (
    TokenSet,
    bos_mode,
    bos_token_id,
    check_calibration,
    load_calibration,
    load_token_file,
    split_eval_sets,
)
from prac.jobs.config import PruneJob
from prac.model.loading import load_tokenizer, model_context, model_vocab_size
from prac.model.units import model_units

log = logging.getLogger(__name__)


def resolve(job: PruneJob, model) -> PruneJob:
    """Fill defaults that depend on the model (:func:`folder_defaults`) and refuse a ``seqlen`` or
    ``eval_seqlen`` beyond the model's context. Used by prune, eval and verify."""
    defaults, origin = folder_defaults(job.model, model)
    context = model_context(model.config)
    seqlen = job.seqlen or defaults["seqlen"]
    calib = job.calib or defaults["calib"]
    ev = job.eval or defaults["eval"]
    eval_seqlen = job.eval_seqlen or (defaults.get("eval_seqlen") if job.seqlen is None else None) or seqlen
    if context is not None:
        if seqlen > context:
            raise PracError(f"--seqlen {seqlen} is beyond the model's context of {context} tokens "
                            f"(max_position_embeddings)")
        if ev != "none" and eval_seqlen > context:
            raise PracError(f"--eval-seqlen {eval_seqlen} is beyond the model's context of {context} tokens "
                            f"(max_position_embeddings)")
    bos = defaults["bos"] if job.bos == "auto" and defaults.get("bos") else bos_mode(job.bos, model.config)
    return replace(job, seqlen=seqlen, calib=calib, eval=ev, eval_seqlen=eval_seqlen, model_context=context,
                   model_vocab_size=model_vocab_size(model), defaults_from=origin, bos_resolved=bos)


def resolve_save_format(job: PruneJob, model, say: bool = False) -> PruneJob:
    """``save_format="auto"`` settled on ``model``'s layers: ``compressed`` for a quantized prune whose
    quantized layers compressed-tensors can hold (symmetric grids, ``nn.Linear`` layers), else ``dense``.
    ``say``: a quantized ``--save`` that falls back to dense says so in one line (a warning), e.g. an MoE
    model, whose fused experts are 3D tensors, not linears."""
    if job.save_format != "auto":
        return job
    quant = job.prune.quant
    if not quant.active:
        return replace(job, save_format="dense")
    why = None
    if not quant.symmetric:
        why = "--asym grids (transformers cannot load packed zero points)"
    else:
        for name, unit in ((n, u) for _b, _i, units in model_units(model, job.prune.ignore) for n, u in units.items()):
            if unit.kind == "expert":
                why = f"fused MoE experts ({name.rsplit('.', 2)[0]}: 3D tensors, not linears)"
                break
            if unit.kind != "linear":
                why = f"{name} is a {unit.kind}, not a linear"
                break
    if why is not None and say and job.save:
        log.warning("--save-format auto: saving dense weights (quantized values as floats), not compressed-tensors: "
                    "the format cannot hold %s", why)
    return replace(job, save_format="dense" if why else "compressed")


# --- the windows: BOS and calibration tokens -----------------------------------------------------

def window_bos(job: PruneJob, tokenizer) -> int | None:
    """The token id put at the start of every window the job cuts from a text (``bos_resolved`` always),
    or None (never)."""
    if job.bos_resolved != "always":
        return None
    return bos_token_id(tokenizer, _bos_why(job.bos, job.bos_resolved))


def _bos_why(requested: str, resolved: str | None) -> str:
    return "--bos always" if requested == "always" else f"--bos {requested} (here: {resolved}, for this model)"


def check_bos_token(path_or_id: str, requested: str, resolved: str | None) -> None:
    """Before the weights load: a ``--bos`` that resolves to ``always`` needs a tokenizer with a BOS token
    (the tokenizer alone is read)."""
    if resolved == "always":
        bos_token_id(load_tokenizer(path_or_id), _bos_why(requested, resolved))


def calibration_tokens(job: PruneJob, tokenizer) -> TokenSet:
    """The job's calibration windows: exact tokens from a file (as given, ``--bos`` aside), or sampled
    from its text (with BOS at every window's start when ``bos_resolved`` is always); checked by
    :func:`prac.io.data.check_calibration` against the model ``resolve`` recorded in the job."""
    if job.calib_tokens:
        tokens = load_token_file(job.calib_tokens)
    else:
        tokens = load_calibration(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed, window_bos(job, tokenizer))
    return check_calibration(tokens, job.model_vocab_size, job.model_context)


# --- defaults that depend on the model folder ----------------------------------------------------

_BUNDLED_ORIGIN = "bundled model"
_COPY_ORIGIN = "copy of the bundled model (same config.json and model.safetensors)"
_SAVED_ORIGIN = "prac_report.json of the saved model"
_GENERIC_ORIGIN = "model config"
_CONFIG_NOISE = {"_name_or_path", "transformers_version"}


def _bundled_defaults() -> dict[str, Any]:
    return {"seqlen": assets.DEFAULT_MODEL_SEQLEN, "calib": str(assets.DEFAULT_CALIB),
            "eval": str(assets.DEFAULT_EVAL), "eval_seqlen": None, "bos": None}


def _generic_defaults(model) -> dict[str, Any]:
    context = model_context(model.config) if model is not None else None
    return {"seqlen": min(2048, context or 2048), "calib": "c4", "eval": "none", "eval_seqlen": None, "bos": None}


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_config_json(path: Path) -> dict | None:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if k not in _CONFIG_NOISE} if isinstance(data, dict) else None


def is_bundled_copy(path_or_id: str) -> bool:
    """A folder holding a bundled model's weights: equal ``config.json`` (up to name/version keys)
    and a byte-identical ``model.safetensors`` (size first, then sha256)."""
    return any(_is_copy_of(Path(path_or_id).expanduser(), ref) for ref in assets.BUNDLED_MODELS)


def _is_copy_of(path: Path, ref: Path) -> bool:
    weights, ref_weights = path / "model.safetensors", ref / "model.safetensors"
    try:
        if not weights.is_file() or weights.stat().st_size != ref_weights.stat().st_size:
            return False
        if _model_config_json(path) != _model_config_json(ref):
            return False
        a, b = weights.stat(), ref_weights.stat()
        return (_file_sha256(str(weights), a.st_size, a.st_mtime_ns)
                == _file_sha256(str(ref_weights), b.st_size, b.st_mtime_ns))
    except OSError:
        return False


def _source_defaults(path_or_id: str, model) -> tuple[dict[str, Any], str] | None:
    if assets.is_default_model(path_or_id):
        return _bundled_defaults(), _BUNDLED_ORIGIN
    if is_bundled_copy(path_or_id):
        return _bundled_defaults(), _COPY_ORIGIN
    return None


def saved_protocol(path_or_id: str) -> dict[str, Any] | None:
    """The protocol a prac-saved folder's ``prac_report.json`` records, or None (no report, or not prac's).

    Keys: ``seqlen`` (calibration), ``calib``, ``eval``, ``eval_seqlen``, ``bos`` (always/never, as the run
    settled ``--bos``; None in a report older than the option), ``source_model``; a recorded text file that
    no longer exists is left out (with a warning)."""
    report_path = Path(path_or_id).expanduser() / "prac_report.json"
    if not report_path.is_file():
        return None
    try:
        config = json.loads(report_path.read_text(encoding="utf-8"))["config"]
        calib_proto = config.get("calibration") or {}
        out = {"seqlen": int(calib_proto.get("seqlen") or config["seqlen"]), "source_model": config.get("model")}
        if config.get("calib_tokens"):
            out["calib"] = None
        else:
            out["calib"] = config.get("calib")
        ev = config.get("eval")
        out["eval"] = ev if ev and ev != "none" else None
        out["eval_seqlen"] = int(config["eval_seqlen"]) if out["eval"] and config.get("eval_seqlen") else None
        out["bos"] = config.get("bos_resolved") if config.get("bos_resolved") in ("always", "never") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is not a prac report: its protocol is not reused", report_path)
        return None
    for key in ("calib", "eval"):
        value = out[key]
        parts = split_eval_sets(value) if key == "eval" and value else [value]
        if value and any(v not in ("c4", "wikitext2") and not Path(v).expanduser().is_file() for v in parts):
            log.warning("%s records %s %r, which no longer exists: not reused", report_path, key, value)
            out[key] = None
            if key == "eval":
                out["eval_seqlen"] = None
    return out


def folder_defaults(path_or_id: str, model) -> tuple[dict[str, Any], str]:
    """Defaults (``seqlen``, ``calib``, ``eval``, ``eval_seqlen``, ``bos``: None = by the model type) for a
    model, and which rule gave them.

    In order: the bundled model; a folder prac saved (its ``prac_report.json``; what it does not
    record comes from the model it was pruned from); a copy of the bundled model; else the model's config."""
    known = _source_defaults(path_or_id, model)
    if known is not None and known[1] == _BUNDLED_ORIGIN:
        return known
    saved = saved_protocol(path_or_id)
    if saved is not None:
        source = saved.get("source_model")
        base = (_source_defaults(str(source), None) if isinstance(source, str) else None) or known
        out = dict(base[0]) if base else _generic_defaults(model)
        for key in ("seqlen", "calib", "eval", "eval_seqlen", "bos"):
            if saved.get(key) is not None:
                out[key] = saved[key]
        return out, _SAVED_ORIGIN
    if known is not None:
        return known
    return _generic_defaults(model), _GENERIC_ORIGIN
