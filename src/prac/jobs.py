"""The end-to-end jobs behind the CLI: load, calibrate, evaluate, prune, report, save.

Configuration is a frozen dataclass the CLI fills; every check that can fail on bad input runs
before any heavy work, and nothing is written unless the whole job succeeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prac import assets
from prac.data import TokenSet, eval_windows, load_calibration, load_eval_tokens, load_token_file
from prac.errors import PracError
from prac.evaluate import last_hidden_states, mean_cosine, perplexity
from prac.loading import check_model_source, is_causal_lm, load_model, load_tokenizer, resolve_device
from prac.patterns import pattern_to_dict
from prac.pipeline import PruneConfig, check_pattern, prune_model
from prac.progress import Progress, no_progress
from prac.outputs import Outputs, Sources, check_report_path, check_save_dir, stage_json
from prac.report import environment, jsonable, peak_memory, summarize_layers
from prac.saving import stage_model

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
    eval: str | None = None  # wikitext2 | FILE.txt | "none"; None: bundled text for the bundled model
    eval_seqlen: int | None = None
    eval_batch_size: int = 1
    dense_eval: bool = True
    save: str | None = None
    overwrite: bool = False
    report: str | None = None
    device: str = "auto"
    dtype: str = "auto"


def resolve(job: PruneJob, model) -> PruneJob:
    """Fill defaults that depend on the model: sequence length, calibration and evaluation text."""
    bundled = assets.is_default_model(job.model)
    seqlen = job.seqlen
    if seqlen is None:
        max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
        seqlen = assets.DEFAULT_MODEL_SEQLEN if bundled else min(2048, max_pos)
    calib = job.calib or (str(assets.DEFAULT_CALIB) if bundled else "c4")
    ev = job.eval or (str(assets.DEFAULT_EVAL) if bundled else "none")
    return replace(job, seqlen=seqlen, calib=calib, eval=ev, eval_seqlen=job.eval_seqlen or seqlen)


def calibration_tokens(job: PruneJob, tokenizer) -> TokenSet:
    """The job's calibration windows: exact tokens from a file, or sampled from its text."""
    if job.calib_tokens:
        return load_token_file(job.calib_tokens)
    return load_calibration(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed)


class _Evaluator:
    """Perplexity for causal LMs; cosine similarity to the dense hidden states for encoders."""

    def __init__(self, model, tokenizer, job: PruneJob, device, progress: Progress):
        tokens, self.protocol = load_eval_tokens(job.eval, tokenizer)
        self.windows = eval_windows(tokens, job.eval_seqlen)
        self.causal = is_causal_lm(model)
        self.device, self.batch, self.progress = device, job.eval_batch_size, progress
        self.dense_hidden: torch.Tensor | None = None
        self.protocol.update(
            metric="perplexity" if self.causal else "mean cosine similarity of last hidden states to the dense model",
            seqlen=job.eval_seqlen, windows=int(self.windows.shape[0]),
            rule="non-overlapping windows, trailing partial window dropped, no BOS added"
            + (", ppl = exp(mean NLL over all predicted tokens)" if self.causal else ""),
        )

    def dense(self, model) -> dict:
        if self.causal:
            return {"dense_ppl": perplexity(model, self.windows, self.device, self.batch, self.progress)["ppl"]}
        self.dense_hidden = last_hidden_states(model, self.windows, self.device, self.batch, self.progress)
        return {}

    def pruned(self, model) -> dict:
        if self.causal:
            return {"ppl": perplexity(model, self.windows, self.device, self.batch, self.progress)["ppl"]}
        hidden = last_hidden_states(model, self.windows, self.device, self.batch, self.progress)
        return {"cosine_similarity": mean_cosine(self.dense_hidden, hidden)}


def run_prune(job: PruneJob, progress: Progress = no_progress) -> dict[str, Any]:
    """Run a whole pruning job and return its report (also written where the job says)."""
    check_model_source(job.model)
    check_prune_outputs(job)
    device = resolve_device(job.device)
    model = load_model(job.model, job.dtype)
    tokenizer = load_tokenizer(job.model)
    job = resolve(job, model)
    check_pattern(model, job.prune.pattern, job.prune.ignore)
    calib = calibration_tokens(job, tokenizer)
    evaluator = None if job.eval == "none" else _Evaluator(model, tokenizer, job, device, progress)

    summary: dict[str, Any] = {}
    if evaluator and (job.dense_eval or not evaluator.causal):
        summary.update(evaluator.dense(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    outcome = prune_model(model, calib.input_ids, job.prune, device, progress)
    summary["prune_seconds"] = round(time.perf_counter() - started, 3)
    summary["phase_seconds"] = {k: round(v, 3) for k, v in outcome.phase_seconds.items()}
    summary.update(peak_memory(device))
    summary.update(summarize_layers(outcome.layers))
    if job.prune.correction.method != "none":
        from prac import correction

        summary["correction"] = correction.summarize([l["correction"] for l in outcome.layers if "correction" in l])
    if evaluator:
        summary.update(evaluator.pruned(model))

    report = {
        "config": {**_config_dict(job), "calibration": calib.protocol,
                   "evaluation": evaluator.protocol if evaluator else None,
                   "blocks": outcome.blocks_path, "activation_device": outcome.activation_device},
        "environment": environment(device),
        "layers": outcome.layers,
        "summary": summary,
    }
    with Outputs() as outputs:  # both land, or neither (a failed save leaves no report of it)
        if job.save:
            check_save_dir(job.save, _sources(job), job.overwrite)  # again: the folder may have changed
            outputs.add(stage_model(model, tokenizer, job.save, report))
        if job.report:
            outputs.add(stage_json(job.report, report))
        outputs.commit()
    return report


def _sources(job: PruneJob) -> Sources:
    return Sources(model=job.model, files=tuple(f for f in (job.calib, job.calib_tokens, job.eval) if f))


def check_prune_outputs(job: PruneJob) -> None:
    """Every destination of a prune checked before the model is loaded (see :mod:`prac.outputs`)."""
    sources = _sources(job)
    save = check_save_dir(job.save, sources, job.overwrite) if job.save else None
    if job.report:
        report = check_report_path(job.report, sources)
        if save is not None and (report == save or save in report.parents):
            raise PracError(f"report file {job.report!r} is inside the --save folder, which prac replaces whole; "
                            f"the folder gets its own prac_report.json")


def _config_dict(job: PruneJob) -> dict[str, Any]:
    out = jsonable(job)
    out["prune"]["pattern"] = pattern_to_dict(job.prune.pattern)
    return out


@dataclass(frozen=True)
class EvalJob:
    model: str = str(assets.DEFAULT_MODEL)
    data: str | None = None
    seqlen: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    report: str | None = None


def run_eval(job: EvalJob, progress: Progress = no_progress) -> dict[str, Any]:
    """Perplexity of a causal LM on a text (``prac eval``)."""
    check_model_source(job.model)
    if job.report:
        check_report_path(job.report, Sources(model=job.model, files=(job.data,) if job.data else ()))
    device = resolve_device(job.device)
    model = load_model(job.model, job.dtype)
    if not is_causal_lm(model):
        raise PracError(f"{job.model} is not a causal LM: perplexity does not exist for it")
    tokenizer = load_tokenizer(job.model)
    resolved = resolve(PruneJob(model=job.model, seqlen=job.seqlen, eval=job.data), model)
    tokens, protocol = load_eval_tokens(resolved.eval if resolved.eval != "none" else "wikitext2", tokenizer)
    windows = eval_windows(tokens, resolved.seqlen)
    result = perplexity(model, windows, device, job.batch_size, progress)
    report = {"config": {**jsonable(job), "seqlen": resolved.seqlen, "evaluation": protocol},
              "environment": environment(device), "summary": result}
    if job.report:
        with Outputs() as outputs:
            outputs.add(stage_json(job.report, report))
            outputs.commit()
    return report
