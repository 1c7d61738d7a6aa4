"""Evaluation: perplexity for causal LMs, cosine similarity of hidden states for encoders.

Perplexity follows the reference (Wanda/SparseGPT) protocol: non-overlapping ``seqlen`` windows,
each scored independently with no BOS added, ppl = exp(mean NLL over every predicted token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prac.core.progress import Progress, no_progress
from prac.engine.memory import eval_batch_windows, free_memory, placed_whole
from prac.model.blocks import find_blocks, move_outside_blocks


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` on ``device``: whole if it fits in half the free memory, else one block at a time
    (:func:`prac.engine.memory.placed_whole`)."""
    if device.type == "cpu":
        yield
        return
    if placed_whole(_param_bytes(model), free_memory(device)):
        model.to(device)
        try:
            yield
        finally:
            model.to("cpu")
        return
    blocks = find_blocks(model)
    handles = []
    for block in blocks.modules:
        handles.append(block.register_forward_pre_hook(lambda m, a: m.to(device)))
        handles.append(block.register_forward_hook(lambda m, a, o: m.to("cpu")))
    move_outside_blocks(model, blocks, device)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        move_outside_blocks(model, blocks, torch.device("cpu"))


def _flags(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, progress: Progress = no_progress,
    desc: str = "eval",
) -> dict:
    """Perplexity of a causal LM on token windows ``[n, seqlen]``; NLL summed in float64.

    ``batch_size`` windows go through the model at once. Every window has the same length, so a
    batch needs no padding or attention mask and each window's logits are those it gets alone (up to
    float rounding in the batched matmuls): each window's NLL is summed in float32 over its own
    tokens, then the windows are summed in float64 in their order, so the result is independent of
    ``batch_size`` to ~1e-7 relative.

    Returns ``ppl``, ``mean_nll``, ``nll_sum`` (float64 sum over all predicted tokens), ``predicted_tokens``,
    ``windows``, ``seqlen`` and ``finite``. ``ppl`` is ``nan`` when some logit is not finite and ``inf``
    when the mean NLL overflows ``exp``; ``finite`` says whether it is a number (the job's ``status``
    is built from it). ``desc`` labels the progress bar (``dense eval``/``pruned eval`` in a prune)."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, seqlen], got shape {tuple(windows.shape)}")
    total_nll = 0.0
    total_tokens = 0
    batches = windows.split(max(1, int(batch_size)))
    with placed(model, device):
        for ids in progress(batches, desc, len(batches)):
            ids = ids.to(device)
            logits = model(input_ids=ids, **_flags(model)).logits
            per_window = window_nll(logits, ids)
            for value in per_window.double().tolist():
                total_nll += value
            total_tokens += ids[:, 1:].numel()
            del logits
    mean = total_nll / total_tokens if total_tokens else math.nan
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return {"ppl": ppl, "mean_nll": mean, "nll_sum": total_nll, "finite": math.isfinite(ppl),
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "predicted_tokens": total_tokens}


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window ``[b]`` (float32) from ``logits [b, seqlen, vocab]``.

    One window at a time, so the float32 upcast of the logits never holds more than one window's
    ``seqlen × vocab`` (the full batch in fp32 would double the peak of a half-precision model)."""
    out = torch.empty(ids.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(ids.shape[0]):
        out[i] = F.cross_entropy(logits[i, :-1].float(), ids[i, 1:], reduction="sum")
    return out


# --- the default batch size -------------------------------------------------------------------------

#: Tokens per forward the CPU default aims at: batching amortises the per-forward overhead and the
#: thread synchronisation of small matmuls (the bundled model at 256 tokens: 64 windows took 50 s one
#: at a time, 20 s eight at a time, 11 s 32 at a time on 2 busy cores, same ppl to every digit).
CPU_EVAL_TOKENS = 8192
#: Most memory the CPU default lets one batch's logits and loss take (see :func:`window_bytes`).
CPU_LOGITS_BUDGET = 1 << 30
#: Upper bound of the CUDA default (beyond it nothing is gained on any current card).
MAX_EVAL_BATCH = 64


def window_bytes(config, seqlen: int, dtype_bytes: int) -> int:
    """Memory one window of ``seqlen`` tokens needs in an inference forward, in bytes (an upper estimate).

    From the config alone, for a decoder of hidden size h, MLP width f, a heads, vocabulary V:

    - logits and their loss: ``seqlen·V·(dtype_bytes + 4 + 4)`` — the model's logits, one float32
      copy of one window and cross-entropy's log-softmax (``window_nll`` upcasts one window at a
      time, but counting it for every window keeps the estimate an upper bound);
    - the live activations of one block (its outputs are freed as the next block runs, since no
      gradients are kept): residual stream, normed input, q/k/v/attention output (≈ 6h) and the
      MLP's gate/up/act/product (≈ 4f) — ``seqlen·(6h + 4f)·dtype_bytes``, doubled for the
      allocator's slack and temporaries;
    - attention scores ``a·seqlen²·4`` in case the eager (materialised, fp32 softmax) path runs.

    Mistral-7B at 2048 tokens in fp16: 0.67 GB logits + 0.64 GB activations + 0.54 GB scores ≈ 1.8 GB
    per window (measured forwards need less: SDPA does not materialise the scores).
    """
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
    ffn = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0)
              or getattr(config, "n_inner", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 32000)
    logits = seqlen * vocab * (dtype_bytes + 8)
    activations = 2 * seqlen * (6 * hidden + 4 * ffn) * dtype_bytes
    scores = heads * seqlen * seqlen * 4
    return logits + activations + scores


def resident_bytes(model: nn.Module, free_bytes: int) -> int:
    """What :func:`placed` keeps on the accelerator during an evaluation: the whole model when it fits in
    half the free memory, else everything outside the blocks plus one block (they are moved in turn)."""
    total = _param_bytes(model)
    if placed_whole(total, free_bytes):
        return total
    try:
        blocks = find_blocks(model)
    except Exception:  # noqa: BLE001 - no repeated blocks: it is placed whole or not at all
        return total
    largest = max((_param_bytes(b) for b in blocks.modules), default=0)
    inside = sum(_param_bytes(b) for b in blocks.modules)
    return total - inside + largest


def default_eval_batch_size(model: nn.Module, seqlen: int, device: torch.device, free_bytes: int | None = None) -> int:
    """Windows per evaluation forward when the user gives none.

    CPU: :data:`CPU_EVAL_TOKENS` tokens per batch, fewer when the logits of that many windows would
    exceed :data:`CPU_LOGITS_BUDGET` (32 windows for the bundled model at 256 tokens; 1 for a 7B model
    with a 32k vocabulary at 2048). CUDA: how many windows of :func:`window_bytes` fit into
    :data:`prac.engine.memory.EVAL_BATCH_SHARE` of the memory left free once :func:`placed` has put the weights on
    the device (``free_bytes``: ``torch.cuda.mem_get_info`` when not given). A 7B model in fp16
    (14.5 GB) on a 24 GB card is evaluated a block at a time (it is more than half the free memory),
    leaving ~22.5 GB: 0.6 × 22.5 / 1.88 ≈ 7 windows at 2048 tokens, ~14 GB planned; on an 80 GB card
    it is placed whole and gets ~20. Always at least 1 and at most :data:`MAX_EVAL_BATCH`."""
    device = torch.device(device)
    param = next(model.parameters(), None)
    dtype_bytes = param.element_size() if param is not None else 2
    if device.type != "cuda":
        vocab = int(getattr(model.config, "vocab_size", 0) or 32000)
        by_logits = CPU_LOGITS_BUDGET // (seqlen * vocab * (dtype_bytes + 8))
        return int(max(1, min(MAX_EVAL_BATCH, CPU_EVAL_TOKENS // seqlen, by_logits)))
    if free_bytes is None:
        free_bytes = free_memory(device)
    left = free_bytes - resident_bytes(model, free_bytes)
    per_window = window_bytes(model.config, seqlen, dtype_bytes)
    return int(max(1, min(MAX_EVAL_BATCH, eval_batch_windows(left, per_window))))


@torch.no_grad()
def last_hidden_states(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, progress: Progress = no_progress,
    desc: str = "eval",
) -> torch.Tensor:
    """The encoder's last hidden states for each window, fp32 on the CPU ``[n, seqlen, hidden]``."""
    outs = []
    batches = windows.split(batch_size)
    with placed(model, device):
        for ids in progress(batches, desc, len(batches)):
            out = model(input_ids=ids.to(device))
            outs.append(out.last_hidden_state.float().cpu())
    return torch.cat(outs)


def mean_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity between two ``[..., hidden]`` tensors."""
    return float(F.cosine_similarity(reference.double(), other.double(), dim=-1).mean())
