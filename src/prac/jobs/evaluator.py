"""Evaluation of a job's model: the evaluation texts cut into checked windows (:func:`load_eval_set`,
shared by ``prac prune`` and ``prac eval``), the perplexity scorer with or without torchrun
(:func:`scorer`), and :class:`Evaluator`, which judges the dense and the pruned model of a prune
(perplexity with a dense-perplexity cache, an encoder's cosine to its dense hidden states, zero-shot tasks)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.io.data import bos_protocol, check_token_ids, eval_windows, load_eval_tokens, split_eval_sets
from prac.io.report import jsonable
from prac.jobs.config import PruneJob
from prac.jobs.defaults import window_bos
from prac.model.loading import is_causal_lm
from prac.parallel import session as distributed
from prac.parallel.evaluate import default_eval_batch_size, last_hidden_states, mean_cosine, perplexity

log = logging.getLogger(__name__)


def eval_rule(bos: int | None, causal: bool = True) -> str:
    """The evaluation windows' rule as the report states it."""
    return ("non-overlapping windows, trailing partial window dropped, "
            + ("no BOS added" if bos is None else f"the first token of every window replaced by BOS (id {bos})")
            + (", ppl = exp(mean NLL over all predicted tokens)" if causal else ""))


@dataclass
class EvalSet:
    """One evaluation set: its name, token windows and protocol (for the report)."""

    name: str
    windows: torch.Tensor
    protocol: dict[str, Any]


def load_eval_set(name: str, tokenizer, job: PruneJob, bos: int | None) -> EvalSet:
    """The text ``name`` cut into the resolved job's ``eval_seqlen`` windows (the first token of each
    replaced by ``bos`` unless None), its ids checked against the model's vocabulary. The protocol is the
    text's own (:func:`prac.io.data.load_eval_tokens`); each caller adds what its report states."""
    tokens, protocol = load_eval_tokens(name, tokenizer, job.eval_seqlen)
    windows = eval_windows(tokens, job.eval_seqlen, bos)
    check_token_ids(windows, job.model_vocab_size, f"evaluation text {name}")
    return EvalSet(name, windows, protocol)


def scorer(session: distributed.Session | None) -> Callable[..., dict[str, Any]]:
    """The perplexity function, :func:`prac.parallel.evaluate.perplexity`'s signature: that one, or under
    torchrun the windows scored split across the ranks (:func:`prac.parallel.session.perplexity`)."""
    return perplexity if session is None else functools.partial(distributed.perplexity, session)


class Evaluator:
    """Perplexity for causal LMs on every ``--eval`` set, cosine similarity to the dense hidden states
    for encoders, and zero-shot tasks (:mod:`prac.parallel.harness`) on the pruned model.

    The first set gives the summary's ``ppl``/``dense_ppl``; with several, ``eval_sets`` holds each.
    The dense perplexity is read from :class:`prac.io.cache.PplCache` when the same weights were
    evaluated on the same windows under the same protocol before (``job.cache``; the summary's
    ``dense_ppl_cached`` says so). ``score`` computes a perplexity; it has
    :func:`prac.parallel.evaluate.perplexity`'s signature, so a multi-process scorer can replace it."""

    def __init__(self, model, tokenizer, job: PruneJob, device, progress: Progress):
        self.causal = is_causal_lm(model)
        names = split_eval_sets(job.eval)
        bos = window_bos(job, tokenizer) if names else None
        self.sets = [self._load(name, tokenizer, job, bos) for name in names]
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

    def _load(self, name: str, tokenizer, job: PruneJob, bos: int | None) -> EvalSet:
        s = load_eval_set(name, tokenizer, job, bos)
        s.protocol.update(
            metric="perplexity" if self.causal else "mean cosine similarity of last hidden states to the dense model",
            seqlen=job.eval_seqlen, windows=int(s.windows.shape[0]), rule=eval_rule(bos, self.causal),
            **bos_protocol(bos),
        )
        return s

    def _summary(self, key: str) -> dict[str, Any]:
        """The first set's ``key`` at the top, and every set's results under ``eval_sets`` when there are several."""
        out: dict[str, Any] = {}
        if self.sets and key in self.results[self.sets[0].name]:
            out[key] = self.results[self.sets[0].name][key]
        if len(self.sets) > 1:
            out["eval_sets"] = self.results
        return out

    def _dense_ppl(self, model, s: EvalSet, weights: list[str]) -> tuple[dict, bool]:
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
