"""The end-to-end jobs behind the CLI: load, calibrate, evaluate, prune, report, save.

Configuration is a frozen dataclass the CLI fills; every check that can fail on bad input runs
before any heavy work, and nothing is written unless the whole job succeeded.

Defaults that depend on the model (:func:`folder_defaults`): the bundled model, and any copy of it
(same ``config.json`` and byte-identical ``model.safetensors``), calibrate and evaluate on the bundled
text with 256-token windows; a folder prac saved reuses the protocol its ``prac_report.json``
records (calibration seqlen and text, evaluation text and seqlen); any other model gets 2048 capped
at its context, ``c4`` and no evaluation. The report's ``config.defaults_from`` says which applied.

The summary's ``status`` is ``"ok"`` when every metric (``ppl``, ``dense_ppl``,
``cosine_similarity``) is finite, else ``"not_finite"`` (the metrics are written as JSON ``null``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseMeter
from prac.engine.pipeline import PruneConfig, check_pattern, check_quant, held_out_sequences, prune_model, sweep_blocksize
from prac.io import assets
from prac.io.data import (
    HUB_DATASETS,
    TokenSet,
    bos_mode,
    bos_protocol,
    bos_token_id,
    check_calibration,
    check_text_source,
    check_token_ids,
    eval_windows,
    load_calibration,
    load_eval_tokens,
    load_token_file,
    split_eval_sets,
)
from prac.io.outputs import Outputs, Sources, StagedFile, check_path_given, check_report_path, check_save_dir, stage_json
from prac.io.report import environment, jsonable, summarize_layers
from prac.io.saving import stage_model
from prac.jobs.allocation import AllocationConfig, allocate
from prac.methods.patterns import pattern_to_dict
from prac.model.loading import (
    check_model_source,
    check_tokenizer_source,
    is_causal_lm,
    load_model,
    load_tokenizer,
    model_context,
    model_skeleton,
    model_vocab_size,
    resolve_device,
)
from prac.model.units import model_units
from prac.parallel import session as distributed
from prac.parallel.evaluate import default_eval_batch_size, last_hidden_states, mean_cosine, perplexity
from prac.parallel.harness import ZeroShotConfig
from prac.quant.formats.compressed import check_compressed
from prac.quant.gptq import summarize_quantization

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneJob:
    """A ``prac prune`` run. ``None`` fields are resolved from the model (see :func:`resolve`)."""

    model: str = str(assets.DEFAULT_MODEL)
    calib: str | None = None  # c4 | wikitext2 | FILE.txt | FILE.jsonl; None: bundled text for the bundled model, else c4
    calib_tokens: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    prune: PruneConfig = PruneConfig()
    allocation: AllocationConfig = AllocationConfig()
    plot: str | None = None  # figure of the allocation plan
    eval: str | None = None  # wikitext2 | c4 | FILE.txt | FILE.jsonl | "none", comma-separated; None: bundled text for the bundled model
    eval_seqlen: int | None = None
    eval_batch_size: int | None = None  # None: chosen for the device (prac.parallel.evaluate.default_eval_batch_size)
    dense_eval: bool = True
    cache: bool = True  # reuse/store the dense perplexity (prac.io.cache); False: always compute it
    tasks: ZeroShotConfig | None = None  # zero-shot tasks (lm-evaluation-harness) run on the pruned model
    save: str | None = None
    overwrite: bool = False
    save_format: str = "dense"  # dense | compressed (compressed-tensors' pack-quantized; needs prune.quant) | auto
    report: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    bos: str = "auto"  # auto | always | never: BOS at the start of every calibration/evaluation window (prac.io.data)
    # Filled by resolve() from the loaded model (recorded in the report, not settings):
    bos_resolved: str | None = None  # always | never (auto settled by the model type, or a saved folder's report)
    model_context: int | None = None  # max_position_embeddings or equivalent
    model_vocab_size: int | None = None  # rows of the input embedding
    defaults_from: str | None = None  # which rule gave the defaults (see folder_defaults)


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
        return _file_sha256(str(weights), a.st_size, a.st_mtime_ns) == _file_sha256(str(ref_weights), b.st_size, b.st_mtime_ns)
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


# --- checks before any work ----------------------------------------------------------------------

def check_prune_inputs(job: PruneJob) -> None:
    """Checks of a prune's settings that need no model, run before it is loaded: the ``--ignore`` regex,
    the ``--eval`` list, the calibration and evaluation texts given (:func:`check_sources`) and the
    zero-shot tasks (names known, data reachable; see :mod:`prac.parallel.harness`)."""
    check_ignore(job.prune.ignore)
    split_eval_sets(job.eval)
    check_sources(job.calib, job.calib_tokens, job.eval)
    if job.tasks is not None:
        from prac.parallel.harness import prepare

        prepare(job.tasks)


def check_sources(calib: str | None, calib_tokens: str | None, ev: str | None, note: str = "") -> None:
    """The calibration text (or token file) and the evaluation texts named, read before any model is:
    a missing, unreadable or binary file, a malformed token file or ``.jsonl``, or a hub text the hub
    cannot give is one line now rather than after the load (:func:`prac.io.data.check_text_source`)."""
    if calib_tokens:
        load_token_file(calib_tokens)
    elif calib:
        check_text_source(calib, "--calib" + note)
    for name in split_eval_sets(ev):
        check_text_source(name, "--eval" + note)


def check_without_weights(job: PruneJob) -> None:
    """What needs the model's shapes but not its weights, on its meta-device skeleton
    (:func:`prac.model.loading.model_skeleton`), before the load: the folder's tokenizer, the defaults and
    context lengths (:func:`resolve`) and the texts the defaults name, the N:M pattern and the
    quantization grid against every layer's inputs, and ``--ignore`` leaving something to prune.
    Without a skeleton (a config transformers cannot build on ``meta``) they run after the load only."""
    skeleton = model_skeleton(job.model)
    if skeleton is None:
        check_bos_token(job.model, job.bos, job.bos if job.bos == "always" else None)
        return
    check_tokenizer_source(job.model)
    with _muted(log):  # its warnings (a saved protocol's missing text) come once, from the resolve after the load
        early = resolve(job, skeleton)
    check_bos_token(job.model, job.bos, early.bos_resolved)
    check_sources(early.calib if job.calib is None and job.calib_tokens is None else None, None,
                  early.eval if job.eval is None else None, note=f" (default for {job.model})")
    check_model_fits(skeleton, job)


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


def check_model_fits(model, job: PruneJob) -> None:
    """The job's pattern, quantization grid, ``--ignore`` and save format against ``model``'s layers
    (its meta-device skeleton before the load, the loaded model after)."""
    check_pattern(model, job.prune.pattern, job.prune.ignore)
    check_quant(model, job.prune.quant, job.prune.ignore, sweep_blocksize(job.prune))
    check_something_to_prune(model, job.prune.ignore)
    job = resolve_save_format(job, model)
    if job.save and job.save_format == "compressed":
        check_compressed(job.prune.quant, {n: u for _b, _i, units in model_units(model, job.prune.ignore)
                                           for n, u in units.items()})


@contextlib.contextmanager
def _muted(logger: logging.Logger):
    """``logger``'s warnings dropped inside (errors still pass)."""
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def warn_if_evaluated_on_calibration(job: PruneJob) -> None:
    """A warning when an evaluation text is the calibration text (the same file, or a byte-identical
    copy): its numbers then measure the fit to the calibration windows, not quality on unseen text.
    (``c4`` and ``wikitext2`` calibrate on their train split and evaluate on another.)"""
    import filecmp

    if job.calib_tokens or not job.calib or job.calib in HUB_DATASETS:
        return
    for name in split_eval_sets(job.eval):
        try:
            same = name not in HUB_DATASETS and filecmp.cmp(Path(job.calib).expanduser(), Path(name).expanduser(),
                                                            shallow=False)
        except OSError:
            same = False
        if same:
            log.warning("the evaluation text %s is the calibration text %s: the result measures the fit to the "
                        "calibration windows, not quality on unseen text (give --eval another file)", name, job.calib)


def check_ignore(regex: str | None) -> None:
    """``--ignore`` must be a valid regular expression."""
    if regex is None:
        return
    try:
        re.compile(regex)
    except re.error as exc:
        raise PracError(f"--ignore {regex!r} is not a valid regular expression: {exc}") from exc


def check_something_to_prune(model, ignore: str | None) -> int:
    """The number of prunable layers left after ``ignore``; refuses a run that would prune none."""
    from prac.model.units import model_units

    every: list[str] = [name for _b, _i, units in model_units(model) for name in units]
    kept = sum(len(units) for _b, _i, units in model_units(model, ignore))
    if kept == 0:
        example = f" (e.g. {every[0]})" if every else ""
        raise PracError(f"--ignore {ignore!r} matches all {len(every)} prunable layers{example}: nothing to prune")
    return kept


# --- results -------------------------------------------------------------------------------------

METRICS = ("dense_ppl", "ppl", "cosine_similarity")


def set_status(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary["status"]``: ``"ok"`` when every metric present is finite, else ``"not_finite"``
    (with ``summary["not_finite"]`` naming them)."""
    bad = [k for k in METRICS if isinstance(summary.get(k), float) and not math.isfinite(summary[k])]
    for name, result in list((summary.get("eval_sets") or {}).items())[1:]:  # the first is the summary's own
        bad += [f"{k}[{name}]" for k in METRICS if isinstance(result.get(k), float) and not math.isfinite(result[k])]
    summary["status"] = "not_finite" if bad else "ok"
    if bad:
        summary["not_finite"] = bad
    return summary


def json_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report as written: non-finite metrics become ``None`` (JSON ``null``; the status says why)."""
    out = copy.copy(report)
    out["summary"] = {k: (None if k in (*METRICS, "mean_nll") and isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in report["summary"].items()}
    return out


def eval_rule(bos: int | None, causal: bool = True) -> str:
    """The evaluation windows' rule as the report states it."""
    return ("non-overlapping windows, trailing partial window dropped, "
            + ("no BOS added" if bos is None else f"the first token of every window replaced by BOS (id {bos})")
            + (", ppl = exp(mean NLL over all predicted tokens)" if causal else ""))


@dataclass
class _EvalSet:
    """One ``--eval`` set: its name, token windows and protocol (for the report)."""

    name: str
    windows: torch.Tensor
    protocol: dict[str, Any]


class _Evaluator:
    """Perplexity for causal LMs on every ``--eval`` set, cosine similarity to the dense hidden states
    for encoders, and zero-shot tasks (:mod:`prac.parallel.harness`) on the pruned model.

    The first set gives the summary's ``ppl``/``dense_ppl``; with several, ``eval_sets`` holds each.
    The dense perplexity is read from :class:`prac.io.cache.PplCache` when the same weights were
    evaluated on the same windows under the same protocol before (``job.cache``; the summary's
    ``dense_ppl_cached`` says so). ``score`` computes a perplexity; it has
    :func:`prac.parallel.evaluate.perplexity`'s signature, so a multi-process scorer can replace it."""

    def __init__(self, model, tokenizer, job: PruneJob, device, progress: Progress):
        self.causal = is_causal_lm(model)
        self.sets = [self._load(name, tokenizer, job) for name in split_eval_sets(job.eval)]
        if job.tasks is not None and not self.causal:
            raise PracError(f"{job.model} is not a causal LM: zero-shot tasks (--tasks) need one")
        first = self.sets[0] if self.sets else None
        self.windows = first.windows if first else None
        self.device, self.progress, self.tokenizer, self.tasks = device, progress, tokenizer, job.tasks
        self.batch = job.eval_batch_size or default_eval_batch_size(model, job.eval_seqlen or 2048, device)
        self.cache = None
        if job.cache and self.causal:
            from prac.io.cache import PplCache, cache_disabled

            self.cache = None if cache_disabled() else PplCache()
        self.score = perplexity
        self.model_name = job.model
        self.results: dict[str, dict[str, Any]] = {s.name: {} for s in self.sets}
        self.dense_hidden: dict[str, torch.Tensor] = {}
        self.protocol: dict[str, Any] | None = dict(first.protocol) if first else None
        if self.protocol is not None:
            self.protocol["batch_size"] = self.batch
            self.protocol["dense_cache"] = ({"enabled": True, "dir": str(self.cache.root)} if self.cache
                                            else {"enabled": False})
            if len(self.sets) > 1:
                self.protocol["sets"] = {s.name: s.protocol for s in self.sets}
        if job.tasks is not None:
            self.protocol = self.protocol or {}
            self.protocol["zeroshot"] = jsonable(job.tasks)

    def _load(self, name: str, tokenizer, job: PruneJob) -> _EvalSet:
        tokens, protocol = load_eval_tokens(name, tokenizer, job.eval_seqlen)
        bos = window_bos(job, tokenizer)
        windows = eval_windows(tokens, job.eval_seqlen, bos)
        check_token_ids(windows, job.model_vocab_size, f"evaluation text {name}")
        protocol.update(
            metric="perplexity" if self.causal else "mean cosine similarity of last hidden states to the dense model",
            seqlen=job.eval_seqlen, windows=int(windows.shape[0]), rule=eval_rule(bos, self.causal), **bos_protocol(bos),
        )
        return _EvalSet(name, windows, protocol)

    def _summary(self, key: str) -> dict[str, Any]:
        """The first set's ``key`` at the top, and every set's results under ``eval_sets`` when there are several."""
        out: dict[str, Any] = {}
        if self.sets and key in self.results[self.sets[0].name]:
            out[key] = self.results[self.sets[0].name][key]
        if len(self.sets) > 1:
            out["eval_sets"] = self.results
        return out

    def _dense_ppl(self, model, s: _EvalSet, weights: list[str]) -> tuple[dict, bool]:
        key = None
        if self.cache is not None:
            from prac.io.cache import ppl_key, weights_hash

            if not weights:
                weights.append(weights_hash(model))
            key = ppl_key(model, s.windows, self.device, weights=weights[0])
            hit = self.cache.get(key)
            if hit is not None:
                log.info("dense perplexity on %s from the cache (%s)", s.name, self.cache.path(key))
                return hit, True
        result = self.score(model, s.windows, self.device, self.batch, self.progress, desc="dense eval")
        if key is not None:
            self.cache.put(key, result, {"model": self.model_name, "eval": s.name})
        return result, False

    def dense(self, model) -> dict:
        weights: list[str] = []  # the weights' hash, taken once for all sets
        for s in self.sets:
            if self.causal:
                result, cached = self._dense_ppl(model, s, weights)
                self.results[s.name].update(dense_ppl=result["ppl"], dense_cached=cached)
            else:
                self.dense_hidden[s.name] = last_hidden_states(model, s.windows, self.device, self.batch,
                                                               self.progress, desc="dense eval")
        out = self._summary("dense_ppl")
        if self.causal and self.sets:
            out["dense_ppl_cached"] = self.results[self.sets[0].name]["dense_cached"]
        return out

    def pruned(self, model) -> dict:
        for s in self.sets:
            if self.causal:
                result = self.score(model, s.windows, self.device, self.batch, self.progress, desc="pruned eval")
                self.results[s.name]["ppl"] = result["ppl"]
            else:
                hidden = last_hidden_states(model, s.windows, self.device, self.batch, self.progress,
                                            desc="pruned eval")
                self.results[s.name]["cosine_similarity"] = mean_cosine(self.dense_hidden[s.name], hidden)
        out = self._summary("ppl" if self.causal else "cosine_similarity")
        if self.tasks is not None:
            from prac.parallel.harness import run_tasks

            out["zeroshot"] = run_tasks(model, self.tokenizer, self.tasks, self.device,
                                        progress=self.progress is not no_progress)
        return out


def run_prune(job: PruneJob, progress: Progress = no_progress) -> dict[str, Any]:
    """Run a whole pruning job and return its report (also written where the job says).

    The returned summary keeps non-finite metrics as floats (``nan``); the written JSON has ``null``."""
    check_model_source(job.model)
    check_prune_inputs(job)
    job.allocation.check(job.prune.pattern)
    check_prune_outputs(job)
    check_without_weights(job)
    session = distributed.active()  # a rank of `torchrun … prac prune`, or None
    device = session.device if session else resolve_device(job.device)
    meter = PhaseMeter(device)
    with meter("load"):
        model = load_model(job.model, job.dtype)
        tokenizer = load_tokenizer(job.model)
    job = resolve(job, model)
    job = resolve_save_format(job, model, say=True)
    warn_if_evaluated_on_calibration(job)
    check_model_fits(model, job)
    calib = calibration_tokens(job, tokenizer)
    log.info("calibration: %d x %d tokens from %s (defaults from %s)", *calib.input_ids.shape,
             calib.protocol.get("file") or calib.protocol.get("source"), job.defaults_from)
    evaluator = None if job.eval == "none" and job.tasks is None else _Evaluator(model, tokenizer, job, device, progress)
    if evaluator and evaluator.sets:
        log.info("evaluation: %s", ", ".join(f"{s.windows.shape[0]} windows of {job.eval_seqlen} tokens from {s.name}"
                                             for s in evaluator.sets))

    summary: dict[str, Any] = {}
    if evaluator and (job.dense_eval or not evaluator.causal):
        with meter("dense_eval"):
            summary.update(_evaluate(evaluator, model, "dense", session))
        log.info("dense evaluation in %.1f s", meter.seconds["dense_eval"])
    plan = None
    held = held_out_sequences(job.prune, calib.input_ids.shape[0])  # judged on, never fitted
    if job.allocation.active:
        with meter("allocate"):
            fitted = calib.input_ids if held is None else calib.input_ids[~held]
            plan = allocate(model, fitted, job.prune.pattern.target_sparsity, job.allocation,
                            job.prune.engine, device, job.prune.ignore)
        job = replace(job, prune=replace(job.prune, plan=plan.sparsity))
        log.info("%s allocation: %d linears, total sparsity %.6f", plan.method, len(plan.sparsity), plan.total())
    started = time.perf_counter()
    with meter("prune"):
        outcome = prune_model(model, calib.input_ids, job.prune, device, progress,
                              parallel=distributed.DataParallel(session) if session else None)
    summary["prune_seconds"] = round(time.perf_counter() - started, 3)
    log.info("pruned %d layers in %.1f s", len(outcome.layers), summary["prune_seconds"])
    summary["phase_seconds"] = {k: round(v, 3) for k, v in outcome.phase_seconds.items()}
    if held is not None:  # what the masks, corrections and tuning were fitted on, and what judged them
        seqlen = calib.input_ids.shape[1]
        summary["calibration_tokens"] = {"fitted": int((~held).sum()) * seqlen, "held_out": int(held.sum()) * seqlen,
                                         "fitted_sequences": int((~held).sum()), "held_out_sequences": int(held.sum())}
    summary.update(summarize_layers(outcome.layers, outcome.block_weights))
    if outcome.reconstruction:
        from prac.engine.reconstruct import summarize

        summary["reconstruction"] = summarize(outcome.reconstruction)
    if job.prune.quant.active:
        summary["quantization"] = summarize_quantization(outcome.layers, job.prune.quant)
    if job.prune.correction.active:
        from prac import correction

        summary["correction"] = correction.summarize([l.correction for l in outcome.layers if l.correction])
    if evaluator:
        with meter("pruned_eval"):
            summary.update(_evaluate(evaluator, model, "pruned", session))
    for phase in ("load", "allocate", "dense_eval", "pruned_eval"):
        if phase in meter.seconds:
            summary["phase_seconds"][phase] = round(meter.seconds[phase], 3)
    summary.update(meter.summary())
    summary["cache_peak_bytes"] = outcome.cache_peak_bytes  # part of the peak, a cache the run can do without
    summary["weights_resident"] = outcome.resident
    set_status(summary)

    report = {
        "config": {**_config_dict(job), "calibration": calib.protocol,
                   "evaluation": evaluator.protocol if evaluator else None,
                   "blocks": outcome.blocks_path, "activation_device": outcome.activation_device,
                   "allocation_plan": plan.to_dict() if plan else None},
        "environment": _environment(device, session),
        "layers": [l.to_dict() for l in outcome.layers],
        **({"reconstruction": [r.to_dict() for r in outcome.reconstruction]} if outcome.reconstruction else {}),
        "summary": summary,
    }
    written = json_report(report)
    if session:  # every rank got here; only rank 0 writes
        session.barrier("end of the prune")
        if not session.is_main:
            return report
    with Outputs() as outputs:  # both land, or neither (a failed save leaves no report of it)
        if job.save:
            check_save_dir(job.save, _sources(job), job.overwrite)  # again: the folder may have changed
            compressed = (outcome.grids, job.prune.quant) if job.save_format == "compressed" else None
            outputs.add(stage_model(model, tokenizer, job.save, written, compressed, source=job.model))
            report["saved"] = written["saved"]
        if job.report:
            outputs.add(stage_json(job.report, written))
        if job.plot and plan is not None:
            from prac.jobs.allocation_plot import save_allocation_plot

            outputs.add(StagedFile(job.plot, lambda tmp: save_allocation_plot(plan, tmp, Path(job.plot).suffix[1:])))
        outputs.commit()
    return report


def _environment(device: torch.device, session: distributed.Session | None = None) -> dict[str, Any]:
    """:func:`prac.io.report.environment` plus the thread counts bit-identity depends on, and the launch
    (``world_size``, ``backend``: 1 and None without torchrun)."""
    env = environment(device)
    env.setdefault("cpu_threads", torch.get_num_threads())
    env["interop_threads"] = torch.get_num_interop_threads()
    env.update(distributed.describe(session))
    return env


def _evaluate(evaluator: _Evaluator, model, which: str, session: distributed.Session | None) -> dict[str, Any]:
    """``evaluator.dense``/``evaluator.pruned``; under torchrun a causal LM's windows are scored split
    across the ranks (:func:`prac.parallel.session.perplexity`); an encoder's cosine is computed whole on every rank."""
    if session is not None and evaluator.causal:
        import functools

        # Every set, the dense-ppl cache and the report fields stay the single-process ones; only the
        # scoring of windows is split across the ranks.
        evaluator.score = functools.partial(distributed.perplexity, session)
    return getattr(evaluator, which)(model)


def _sources(job: PruneJob) -> Sources:
    return Sources(model=job.model, files=tuple(f for f in (job.calib, job.calib_tokens, *split_eval_sets(job.eval)) if f))


def check_prune_outputs(job: PruneJob) -> None:
    """Every destination of a prune checked before the model is loaded (see :mod:`prac.io.outputs`)."""
    sources = _sources(job)
    for option, value in (("--save", job.save), ("--report", job.report), ("--plot", job.plot)):
        check_path_given(value, option)
    save = check_save_dir(job.save, sources, job.overwrite) if job.save else None
    if job.report:
        report = check_report_path(job.report, sources, overwrite=job.overwrite)
        if save is not None and (report == save or save in report.parents):
            raise PracError(f"report file {job.report!r} is inside the --save folder, which prac replaces whole; "
                            f"the folder gets its own prac_report.json")
    if job.plot:
        if not job.allocation.active:
            raise PracError("--plot draws the allocation plan: it needs --allocation owl or error")
        if Path(job.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise PracError(f"--plot {job.plot!r}: give a .png, .pdf or .svg file name")
        check_report_path(job.plot, sources, what="plot file", overwrite=job.overwrite)


def _config_dict(job: PruneJob) -> dict[str, Any]:
    out = jsonable(job)
    out["prune"]["pattern"] = pattern_to_dict(job.prune.pattern)
    return out


@dataclass(frozen=True)
class EvalJob:
    """A ``prac eval`` run: perplexity on one or more texts and/or zero-shot tasks; for an encoder, the
    cosine similarity of its last hidden states to a dense ``reference`` model's."""

    model: str = str(assets.DEFAULT_MODEL)
    data: str | None = None  # comma-separated sets as for --eval; None: as for prune (none when tasks are given)
    seqlen: int | None = None
    batch_size: int | None = None  # None: chosen for the device (prac.parallel.evaluate.default_eval_batch_size)
    device: str = "auto"
    dtype: str = "auto"
    report: str | None = None
    tasks: ZeroShotConfig | None = None
    overwrite: bool = False  # replace a --report file prac did not write
    reference: str | None = None  # encoders: the dense model compared with; None: the source a prac save names
    bos: str = "auto"  # auto | always | never, as for PruneJob


def encoder_reference(job: EvalJob, causal: bool) -> str | None:
    """The dense model an encoder's last hidden states are compared with: ``job.reference``, else the
    source model a prac-saved folder's report names; None for a causal LM (judged by its perplexity).
    Refuses zero-shot tasks for an encoder, ``--reference`` for a causal LM, and an encoder with no
    reference known (one line naming what to give)."""
    if causal:
        if job.reference:
            raise PracError(f"--reference compares an encoder's hidden states; {job.model} is a causal LM, judged by "
                            f"its perplexity without one")
        return None
    if job.tasks is not None:
        raise PracError(f"{job.model} is not a causal LM: zero-shot tasks (--tasks) need one")
    reference = job.reference or (saved_protocol(job.model) or {}).get("source_model")
    if not reference:
        raise PracError(f"{job.model} is an encoder (no LM head), so it has no perplexity; prac eval compares its "
                        f"last hidden states with a dense model's: give --reference DENSE_MODEL (a folder prac "
                        f"saved names its source itself)")
    check_model_source(str(reference))
    return str(reference)


def run_eval(job: EvalJob, progress: Progress = no_progress) -> dict[str, Any]:
    """Perplexity of a causal LM on one or more texts and/or its zero-shot accuracy (``prac eval``).

    ``seqlen`` and ``data`` default as for ``prune`` (:func:`folder_defaults`): a folder prac saved
    is evaluated on the text and window its report records; with no text known, ``wikitext2``. With
    ``tasks`` and no ``data`` only the tasks run. The first set's numbers are the summary's own
    (``ppl``, ``mean_nll``, ...); with several, ``eval_sets`` holds each set's."""
    check_model_source(job.model)
    sets = split_eval_sets(job.data)
    if job.data is not None and not sets and job.tasks is None:
        raise PracError("--data none leaves nothing to evaluate (give --tasks, or a text)")
    for name in sets:
        check_text_source(name, "--data")
    skeleton = model_skeleton(job.model)  # shapes, no weights: an encoder's reference is settled before the load
    if skeleton is not None:
        check_tokenizer_source(job.model)
        with _muted(log):  # warnings come once, after the load
            encoder_reference(job, is_causal_lm(skeleton))
            early = resolve(PruneJob(model=job.model, seqlen=job.seqlen, eval_seqlen=job.seqlen,
                                     eval=job.data or None, bos=job.bos), skeleton)
            if job.data is None and job.tasks is None:  # the texts the defaults name
                for name in split_eval_sets(early.eval) or ["wikitext2"]:
                    check_text_source(name, f"--data (default for {job.model})")
        check_bos_token(job.model, job.bos, early.bos_resolved)
    else:
        check_bos_token(job.model, job.bos, job.bos if job.bos == "always" else None)
    if job.tasks is not None:
        from prac.parallel.harness import prepare

        prepare(job.tasks)  # unknown task or unreachable data: one line, before the model is loaded
    check_path_given(job.report, "--report")
    if job.report:
        check_report_path(job.report, Sources(model=job.model, files=tuple(sets)), overwrite=job.overwrite)
    session = distributed.active()  # a rank of `torchrun … prac eval`, or None
    device = session.device if session else resolve_device(job.device)
    meter = PhaseMeter(device)
    with meter("load"):
        model = load_model(job.model, job.dtype)
        reference = encoder_reference(job, is_causal_lm(model))
        tokenizer = load_tokenizer(job.model)
        dense = load_model(reference, job.dtype) if reference else None
    resolved = resolve(PruneJob(model=job.model, seqlen=job.seqlen, eval_seqlen=job.seqlen,
                                eval=job.data or None, bos=job.bos), model)
    if job.data is None:
        sets = [] if job.tasks is not None else split_eval_sets(resolved.eval) or ["wikitext2"]
        if sets and resolved.eval == "none" and resolved.model_context is not None \
                and resolved.eval_seqlen > resolved.model_context:
            raise PracError(f"--seqlen {resolved.eval_seqlen} is beyond the model's context of "
                            f"{resolved.model_context} tokens (max_position_embeddings)")
    batch = job.batch_size or default_eval_batch_size(model, resolved.eval_seqlen, device)
    loaded = []
    bos = window_bos(resolved, tokenizer) if sets else None
    for data in sets:
        tokens, protocol = load_eval_tokens(data, tokenizer, resolved.eval_seqlen)
        windows = eval_windows(tokens, resolved.eval_seqlen, bos)
        protocol.update(rule=eval_rule(bos, dense is None), **bos_protocol(bos))
        check_token_ids(windows, resolved.model_vocab_size, f"evaluation text {data}")
        if dense is not None:
            check_token_ids(windows, model_vocab_size(dense), f"evaluation text {data} (for the reference {reference})")
            protocol["metric"] = "mean cosine similarity of last hidden states to the reference model"
        loaded.append((data, windows, protocol))
    result: dict[str, Any] = {}
    per_set: dict[str, dict[str, Any]] = {}
    with meter("eval"):
        for data, windows, _ in loaded:
            if dense is not None:
                per_set[data] = _cosine_to_reference(dense, model, windows, device, batch, progress, data)
                continue
            per_set[data] = (distributed.perplexity(session, model, windows, device, batch, progress, desc="eval")
                             if session else perplexity(model, windows, device, batch, progress, desc=f"eval {data}"))
    if loaded:
        result.update(per_set[loaded[0][0]])
        if len(loaded) > 1:
            result["eval_sets"] = per_set
    if job.tasks is not None:
        from prac.parallel.harness import run_tasks

        with meter("zeroshot"):
            result["zeroshot"] = run_tasks(model, tokenizer, job.tasks, device, progress=progress is not no_progress)
    result["phase_seconds"] = {k: round(v, 3) for k, v in meter.seconds.items()}
    result.update(meter.summary())
    set_status(result)
    report = {"config": {**jsonable(job), "seqlen": resolved.eval_seqlen, "reference_resolved": reference,
                         "bos_resolved": resolved.bos_resolved,
                         "data_resolved": ",".join(sets) if sets else None, "batch_size_resolved": batch,
                         "defaults_from": resolved.defaults_from,
                         "evaluation": loaded[0][2] if loaded else None,
                         **({"evaluation_sets": {d: p for d, _, p in loaded}} if len(loaded) > 1 else {})},
              "environment": _environment(device, session), "summary": result}
    if session:  # every rank got here; only rank 0 writes
        session.barrier("end of the evaluation")
    if job.report and (session is None or session.is_main):
        with Outputs() as outputs:
            outputs.add(stage_json(job.report, json_report(report)))
            outputs.commit()
    return report


def _cosine_to_reference(dense, model, windows: torch.Tensor, device, batch: int, progress: Progress,
                         name: str) -> dict[str, Any]:
    """An encoder's evaluation on one set: the mean cosine over tokens of its last hidden states to the
    dense reference's (as ``prac prune`` reports for encoders)."""
    ref = last_hidden_states(dense, windows, device, batch, progress, desc=f"reference {name}")
    got = last_hidden_states(model, windows, device, batch, progress, desc=f"eval {name}")
    if ref.shape != got.shape:
        raise PracError(f"the reference's last hidden states have {ref.shape[-1]} features, the model's "
                        f"{got.shape[-1]}: give --reference the dense model this one was pruned from")
    return {"cosine_similarity": mean_cosine(ref, got), "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1])}
