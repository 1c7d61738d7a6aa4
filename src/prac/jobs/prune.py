"""``prac prune`` end to end (:func:`run_prune`): check, load, calibrate, evaluate, prune, report, save.

Every check that can fail on bad input runs before any heavy work (:mod:`prac.jobs.checks`), and
nothing is written unless the whole job succeeded."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseMeter
from prac.engine.pipeline import PruneOutcome, held_out_sequences, prune_model
from prac.engine.structure import shrink_model
from prac.io.outputs import Outputs, StagedFile, check_save_dir, stage_json
from prac.io.report import jsonable, summarize_layers
from prac.io.saving import stage_model
from prac.jobs.allocation import allocate
from prac.jobs.checks import (
    check_model_fits,
    check_prune_inputs,
    check_prune_outputs,
    check_without_weights,
    prune_sources,
    warn_if_evaluated_on_calibration,
)
from prac.jobs.config import PruneJob
from prac.jobs.defaults import calibration_tokens, resolve, resolve_save_format
from prac.jobs.evaluator import Evaluator, scorer
from prac.jobs.results import json_report, run_environment, set_status
from prac.methods.patterns import pattern_to_dict
from prac.model.loading import check_model_source, load_model, load_tokenizer, resolve_device
from prac.model.units import block_weight_counts
from prac.parallel import session as distributed
from prac.quant.gptq import summarize_quantization

log = logging.getLogger(__name__)


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
    evaluator = None if job.eval == "none" and job.tasks is None else Evaluator(model, tokenizer, job, device, progress)
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
    structure = None
    if job.shape.active:
        with meter("structure"):
            structure = shrink_model(model, calib.input_ids, job.shape, job.prune.engine, device, progress,
                                     holdout=structure_holdout(job), seed=job.prune.correction.seed,
                                     ignore=job.prune.ignore, width_multiple=max(1, job.prune.quant.group_size)
                                     if job.prune.quant.active else 1,
                                     dense_target_damping=job.prune.dense_target_damping,
                                     parallel=distributed.DataParallel(session) if session else None)
        summary["structure"] = structure.to_dict()
        log.info("structure: block parameters %d -> %d in %.1f s", structure.parameters_before,
                 structure.parameters_after, structure.seconds)
    if job.allocation.active:
        with meter("allocate"):
            fitted = calib.input_ids if held is None else calib.input_ids[~held]
            plan = allocate(model, fitted, job.prune.pattern.target_sparsity, job.allocation,
                            job.prune.engine, device, job.prune.ignore)
        job = replace(job, prune=replace(job.prune, plan=plan.sparsity))
        log.info("%s allocation: %d linears, total sparsity %.6f", plan.method, len(plan.sparsity), plan.total())
    started = time.perf_counter()
    if structure is not None and not prunes_after_structure(job):
        outcome = structure_only_outcome(model, structure)  # nothing left to prune: no second pass
        summary["prune_seconds"] = 0.0
    else:
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
    tuned_structure = structure.reconstruction if structure is not None else []
    if outcome.reconstruction or tuned_structure:
        from prac.engine.reconstruct import summarize

        if outcome.reconstruction:
            summary["reconstruction"] = summarize(outcome.reconstruction)
        if tuned_structure and outcome.reconstruction is not tuned_structure:
            summary["structure"]["reconstruction"] = summarize(tuned_structure)
    if job.prune.quant.active:
        summary["quantization"] = summarize_quantization(outcome.layers, job.prune.quant)
    if job.prune.correction.active:
        from prac import correction

        summary["correction"] = correction.summarize([layer.correction for layer in outcome.layers if layer.correction])
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
        "environment": run_environment(device, session),
        "layers": [layer.to_dict() for layer in outcome.layers],
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
            check_save_dir(job.save, prune_sources(job), job.overwrite)  # again: the folder may have changed
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


def _evaluate(evaluator: Evaluator, model, which: str, session: distributed.Session | None) -> dict[str, Any]:
    """``evaluator.dense``/``evaluator.pruned``; under torchrun a causal LM's windows are scored split
    across the ranks (:func:`prac.parallel.session.perplexity`); an encoder's cosine is computed whole on every rank."""
    if session is not None and evaluator.causal:
        # Every set, the dense-ppl cache and the report fields stay the single-process ones; only the
        # scoring of windows is split across the ranks.
        evaluator.score = scorer(session)
    return getattr(evaluator, which)(model)


def _config_dict(job: PruneJob) -> dict[str, Any]:
    out = jsonable(job)
    out["prune"]["pattern"] = pattern_to_dict(job.prune.pattern)
    if not job.shape.active:
        out.pop("shape", None)  # reports of unstructured runs stay as they were
    return out


def structure_holdout(job: PruneJob) -> float:
    """The share of calibration sequences the structured pass holds out: the tuning's (``--holdout`` of
    the reconstruction, 0.125 by default) when something judges on them (dropping blocks, the
    ``--target-params`` search, tuning),
    else none (the width selection alone fits on every sequence)."""
    judged = (job.prune.engine.reconstruct.active or job.shape.num_hidden_layers is not None
              or job.shape.target_params is not None)
    return job.prune.engine.reconstruct.holdout if judged else 0.0


def prunes_after_structure(job: PruneJob) -> bool:
    """Whether anything is left for the prune pass after the structured one (a sparsity, N:M,
    quantization or an allocation); without, the pass would calibrate every block for nothing."""
    p = job.prune
    return p.pattern.target_sparsity > 0 or p.quant.active or job.allocation.active


def structure_only_outcome(model, structure) -> PruneOutcome:
    """The run's outcome when the structured pass was all of it: no pruned layers; the zeros of every
    block weight of the shrunk model; the tuning's records and phase seconds of the structured pass."""
    zeros = entries = 0
    for block in model.get_decoder().layers:
        z, n = block_weight_counts(block)
        zeros, entries = zeros + z, entries + n
    return PruneOutcome(phase_seconds=dict(structure.phase_seconds), block_weights=(zeros, entries),
                        reconstruction=structure.reconstruction)
