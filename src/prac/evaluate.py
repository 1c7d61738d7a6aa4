"""Evaluation: perplexity for causal LMs, cosine similarity of hidden states for encoders.

Perplexity follows the reference (Wanda/SparseGPT) protocol: non-overlapping ``seqlen`` windows,
each scored independently with no BOS added, ppl = exp(mean NLL over every predicted token).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prac.blocks import find_blocks, move_outside_blocks
from prac.progress import Progress, no_progress


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` on ``device``: whole if it fits in half the free memory, else one block at a time."""
    if device.type == "cpu":
        yield
        return
    free, _ = torch.cuda.mem_get_info(device)
    if _param_bytes(model) < 0.5 * free:
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

    ``ppl`` is ``nan`` when some logit is not finite and ``inf`` when the mean NLL overflows ``exp``;
    ``finite`` says whether it is a number (the job's ``status`` is built from it). ``desc`` labels the
    progress bar (``dense eval``/``pruned eval`` in a prune)."""
    total_nll = 0.0
    total_tokens = 0
    batches = windows.split(batch_size)
    with placed(model, device):
        for ids in progress(batches, desc, len(batches)):
            ids = ids.to(device)
            logits = model(input_ids=ids, **_flags(model)).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll.double())
            total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return {"ppl": ppl, "mean_nll": mean, "finite": math.isfinite(ppl), "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "predicted_tokens": total_tokens}


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
