"""Per-sample losses, Monte-Carlo targets and per-sample gradients (torch.func vmap, or a loop).

Loss of one sample. With logits z ∈ ℝ^{T×V}, targets y and the valid-target mask
m_t = [y_t ≠ −100] ∧ [attention_mask_t = 1] (both taken at the *shifted* positions for a causal LM:
z_t scores y_{t+1}), the per-token loss is ℓ_t = −log softmax(z_t)[y_t] and

    sequence, sum   ℓᵢ = Σ_t m_t ℓ_t              (default)
    sequence, mean  ℓᵢ = Σ_t m_t ℓ_t / Σ_t m_t
    token           ℓᵢₜ = ℓ_t for every t with m_t = 1   (each is its own sample)

This is deliberately not ``model(labels=...).loss``: that is a mean over every token of the batch,
so its gradient is not a per-sample gradient and its scale depends on the batch.

Two engines give the same gᵢ = ∇θ ℓᵢ:
- ``vmap``: ``torch.func.vmap(grad(ℓ))`` over sequences (``jacrev`` of the per-token losses for
  tokens), with the parameters passed through ``functional_call``; one batched backward per chunk.
- ``loop``: one ``torch.autograd.grad`` per sample; slower, but works for every model, including
  ones with data-dependent control flow that vmap cannot batch (e.g. SDPA masks with padding).

``auto`` (:class:`EngineState`) uses vmap and drops to the loop the first time vmap cannot run.

Gradients the caller computed are taken as they are (:func:`stack_precomputed`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from prac.core.errors import PracError
from prac.spectral.solvers import _first_line

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Samples:
    """A batch of sequences ready for per-sample differentiation.

    ``labels`` are the targets actually used (observed, or drawn for the MC Fisher), with −100
    where a position is not a target. ``pass_mask`` is False when every attention-mask entry is 1:
    the mask is then not passed to the model, which is identical and lets vmap batch SDPA models.
    """

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-sequence inputs [B, ...]
    pass_mask: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, start: int, stop: int) -> Samples:
        return Samples(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop],
                       {k: v[start:stop] for k, v in self.extra.items()}, self.pass_mask)

    def to(self, device: torch.device) -> Samples:
        return Samples(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                       {k: v.to(device) for k, v in self.extra.items()}, self.pass_mask)


def make_samples(batch, n_samples: int | None = None) -> tuple[Samples, int]:
    """:class:`Samples` from a ``[B, T]`` tensor of token ids or a mapping with ``input_ids``
    (optional ``attention_mask``, ``labels``; every other tensor with leading dimension B is passed
    to the model). Uses the first ``n_samples`` sequences; returns them and the number available."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise PracError("batch must be a [B, T] tensor of token ids or a mapping with 'input_ids'")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise PracError(f"input_ids must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
    available = int(ids.shape[0])
    n = available if n_samples is None else min(int(n_samples), available)
    if n_samples is not None and n_samples < 1:
        raise PracError(f"n_samples must be >= 1, got {n_samples}")
    if n_samples is not None and n_samples > available:
        log.warning("n_samples=%d requested but the batch has %d sequences: using %d", n_samples, available, available)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(torch.int64).reshape(ids.shape)
    labels = batch.get("labels")
    if labels is None:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels = torch.as_tensor(labels).to(torch.int64).reshape(ids.shape)
    extra = {k: torch.as_tensor(v)[:n] for k, v in batch.items()
             if k not in ("input_ids", "attention_mask", "labels") and isinstance(v, torch.Tensor)
             and v.dim() >= 1 and v.shape[0] == available}
    samples = Samples(ids[:n].to(torch.int64), mask[:n], labels[:n], extra, bool((mask[:n] == 0).any()))
    return samples, available


# --------------------------------------------------------------------------- losses

def target_mask(labels: torch.Tensor, attention_mask: torch.Tensor, shift: bool) -> torch.Tensor:
    """bool [B, T'] of the positions that are targets (T' = T−1 when shifted)."""
    if shift:
        labels, attention_mask = labels[:, 1:], attention_mask[:, 1:]
    return (labels != IGNORE_INDEX) & (attention_mask != 0)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, T'] (zero where not a target) and the target mask [B, T']."""
    if shift:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels
    mask = target_mask(labels, attention_mask, shift)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss itself in at least fp32, as HF does
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none", ignore_index=IGNORE_INDEX).view(targets.shape)
    return ce * mask, mask


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                    shift: bool, reduction: str) -> torch.Tensor:
    """ℓᵢ [B]: token-sum (or token-mean) cross-entropy of each sequence."""
    ce, mask = token_losses(logits, labels, attention_mask, shift)
    total = ce.sum(dim=1)
    if reduction == "mean":
        total = total / mask.sum(dim=1).clamp(min=1)
    return total


# --------------------------------------------------------------------------- model calls

def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   extra: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [B, T, V] of ``model`` (through ``functional_call`` with ``params`` when given)."""
    kwargs = {"input_ids": input_ids, **extra}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False  # a KV cache is dead weight here and confuses vmap
    out = functional_call(model, dict(params), (), kwargs) if params is not None else model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if logits is None and isinstance(out, torch.Tensor):
        logits = out
    if logits is None or logits.dim() != 3:
        raise PracError(f"{type(model).__name__} returns no [B, T, V] logits: use a model with an LM head "
                        "or pass precomputed_gradients")
    return logits


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def sample_mc_labels(model: torch.nn.Module, samples: Samples, shift: bool, seed: int, chunk_size: int) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution, ŷ_t ~ softmax(z_t), one per target position.

    Positions that are not targets keep −100. One CPU generator seeded with ``seed`` is consumed
    sequence by sequence, so the draw does not depend on ``chunk_size`` or the device.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    labels = samples.labels.clone()
    for start in range(0, len(samples), chunk_size):
        part = samples.select(start, start + chunk_size)
        logits = forward_logits(model, part.input_ids, part.attention_mask if part.pass_mask else None, part.extra)
        if shift:
            logits = logits[:, :-1]
        probs = torch.softmax(logits.detach().to("cpu", torch.float64), dim=-1)
        for b in range(probs.shape[0]):
            drawn = torch.multinomial(probs[b], 1, generator=gen).squeeze(1)
            row = labels[start + b, 1:] if shift else labels[start + b]
            keep = row != IGNORE_INDEX
            row[keep] = drawn.to(row.device)[keep]
    return labels


@contextlib.contextmanager
def requires_grad_only(model: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Temporarily make exactly ``names`` require gradients (restored afterwards)."""
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    wanted = set(names)
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        yield {n: params[n] for n in names}
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


# --------------------------------------------------------------------------- engines

def vmap_gradients(model: torch.nn.Module, names: Sequence[str], samples: Samples, unit: str,
                   reduction: str, shift: bool, chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: [n, *shape]}`` with torch.func (one vectorised backward)."""
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in names}
    pass_mask = samples.pass_mask

    def seq_loss(p, ids, am, lab, extra):
        logits = forward_logits(model, ids[None], am[None] if pass_mask else None,
                                {k: v[None] for k, v in extra.items()}, p)
        return sequence_losses(logits, lab[None], am[None], shift, reduction)[0]

    with requires_grad_only(model, ()), warnings.catch_warnings():
        # vmap falls back to a per-sample loop for ops without a batching rule (SDPA on CPU) and
        # says so on every call; the result is still exact, so keep the message out of the output.
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the batching rule")
        if unit == "sequence":
            fn = vmap(grad(seq_loss), in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)
            return fn(primals, samples.input_ids, samples.attention_mask, samples.labels, samples.extra)

        def tok_losses(p, ids, am, lab, extra):
            logits = forward_logits(model, ids[None], am[None] if pass_mask else None,
                                    {k: v[None] for k, v in extra.items()}, p)
            return token_losses(logits, lab[None], am[None], shift)[0][0]

        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        valid = target_mask(samples.labels, samples.attention_mask, shift)
        for b in range(len(samples)):
            jac = jacrev(tok_losses, chunk_size=chunk_size)(
                primals, samples.input_ids[b], samples.attention_mask[b], samples.labels[b],
                {k: v[b] for k, v in samples.extra.items()})
            for n in names:
                out[n].append(jac[n][valid[b]])
        return {n: torch.cat(v) for n, v in out.items()}


def loop_gradients(model: torch.nn.Module, names: Sequence[str], samples: Samples, unit: str,
                   reduction: str, shift: bool) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: [n, *shape]}`` with one ``autograd.grad`` per sample."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with requires_grad_only(model, names) as params:
        plist = [params[n] for n in names]
        for b in range(len(samples)):
            one = samples.select(b, b + 1)
            logits = forward_logits(model, one.input_ids, one.attention_mask if one.pass_mask else None, one.extra)
            if unit == "sequence":
                losses = sequence_losses(logits, one.labels, one.attention_mask, shift, reduction)
            else:
                ce, mask = token_losses(logits, one.labels, one.attention_mask, shift)
                losses = ce[0][mask[0]]
            for i in range(losses.numel()):
                grads = torch.autograd.grad(losses[i], plist, retain_graph=i + 1 < losses.numel(), allow_unused=True)
                for n, g, p in zip(names, grads, plist):
                    rows[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) if v else params_empty(model, n) for n, v in rows.items()}


def params_empty(model: torch.nn.Module, name: str) -> torch.Tensor:
    p = dict(model.named_parameters())[name]
    return p.new_zeros((0, *p.shape))


def is_vmap_unsupported(exc: BaseException) -> bool:
    """True for the errors that mean "this model cannot run under vmap" (not out-of-memory)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, (RuntimeError, NotImplementedError, TypeError))


class EngineState:
    """Which gradient engine is in use; ``auto`` drops to the loop the first time vmap cannot run."""

    def __init__(self, requested: str):
        self.requested = requested
        self.current = requested
        self.vmap_ok = False
        self.reason: str | None = None
        self.seen: set[str] = set()

    def used(self, name: str) -> None:
        self.seen.add(name)
        if name == "vmap":
            self.vmap_ok = True

    def fall_back(self, exc: BaseException) -> None:
        self.reason = _first_line(exc)
        log.warning("vmap cannot differentiate this model (%s): using the per-sample backward loop", self.reason)
        self.current = "loop"

    def describe(self) -> dict:
        used = "vmap" if self.seen == {"vmap"} else "loop" if self.seen == {"loop"} else sorted(self.seen)
        return {"requested": self.requested, "used": used, "fallback_reason": self.reason}


def stack_precomputed(grads) -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}`` from a list of per-sample dicts or an already stacked dict."""
    if isinstance(grads, Mapping):
        out = {n: torch.as_tensor(t) for n, t in grads.items()}
        lengths = {t.shape[0] if t.dim() else -1 for t in out.values()}
        if len(lengths) > 1 or -1 in lengths:
            raise PracError("stacked precomputed_gradients need the same leading sample dimension N in every tensor")
        if not out or next(iter(lengths)) == 0:
            return {}
        return out
    grads = list(grads)
    if not grads:
        return {}
    names = list(grads[0])
    for i, g in enumerate(grads):
        if list(g) != names:
            raise PracError(f"precomputed_gradients[{i}] has different parameter names from sample 0")
    try:
        return {n: torch.stack([torch.as_tensor(g[n]) for g in grads]) for n in names}
    except RuntimeError as exc:
        raise PracError(f"precomputed_gradients have inconsistent shapes: {_first_line(exc)}") from exc
