"""``prac eval`` end to end (:func:`run_eval`): a causal LM's perplexity on one or more texts and/or its
zero-shot accuracy; an encoder's cosine similarity to a dense reference model. The texts are cut and
checked as a prune's evaluation cuts them (:func:`prac.jobs.evaluator.load_eval_set`)."""

from __future__ import annotations

from typing import Any

import torch

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseMeter
from prac.io.data import bos_protocol, check_text_source, check_token_ids, split_eval_sets
from prac.io.outputs import Outputs, Sources, check_path_given, check_report_path, stage_json
from prac.io.report import jsonable
from prac.jobs.checks import muted
from prac.jobs.config import EvalJob, PruneJob
from prac.jobs.defaults import check_bos_token, resolve, saved_protocol, window_bos
from prac.jobs.defaults import log as defaults_log
from prac.jobs.evaluator import EvalSet, eval_rule, load_eval_set, scorer
from prac.jobs.results import json_report, run_environment, set_status
from prac.model.loading import (
    check_model_source,
    check_tokenizer_source,
    is_causal_lm,
    load_model,
    load_tokenizer,
    model_skeleton,
    model_vocab_size,
    resolve_device,
)
from prac.parallel import session as distributed
from prac.parallel.evaluate import default_eval_batch_size, last_hidden_states, mean_cosine


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

    ``seqlen`` and ``data`` default as for ``prune`` (:func:`prac.jobs.defaults.folder_defaults`): a folder
    prac saved is evaluated on the text and window its report records; with no text known, ``wikitext2``.
    With ``tasks`` and no ``data`` only the tasks run. The first set's numbers are the summary's own
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
        with muted(defaults_log):  # warnings come once, after the load
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
    loaded: list[EvalSet] = []
    bos = window_bos(resolved, tokenizer) if sets else None
    for data in sets:
        s = load_eval_set(data, tokenizer, resolved, bos)
        s.protocol.update(rule=eval_rule(bos, dense is None), **bos_protocol(bos))
        if dense is not None:
            check_token_ids(s.windows, model_vocab_size(dense), f"evaluation text {data} (for the reference {reference})")
            s.protocol["metric"] = "mean cosine similarity of last hidden states to the reference model"
        loaded.append(s)
    result: dict[str, Any] = {}
    per_set: dict[str, dict[str, Any]] = {}
    score = scorer(session)
    with meter("eval"):
        for s in loaded:
            if dense is not None:
                per_set[s.name] = _cosine_to_reference(dense, model, s.windows, device, batch, progress, s.name)
                continue
            per_set[s.name] = score(model, s.windows, device, batch, progress,
                                    desc="eval" if session else f"eval {s.name}")
    if loaded:
        result.update(per_set[loaded[0].name])
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
                         "evaluation": loaded[0].protocol if loaded else None,
                         **({"evaluation_sets": {s.name: s.protocol for s in loaded}} if len(loaded) > 1 else {})},
              "environment": run_environment(device, session), "summary": result}
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
