"""Which whole blocks to drop (``--num-hidden-layers``): the blocks whose removal changes the model's
output least, measured on held-out sequences.

The measure is the model's own output — the final norm's output, what the head reads — not a proxy
such as a block's input/output cosine (ShortGPT's block influence): for a candidate block ``i`` the
held-out sequences run through every block but ``i`` and the final norm, and the score is the mean over
tokens ``t`` of ``‖h'_t − h_t‖² / ‖h_t‖²`` against the model's output ``h`` with every block (per token,
as in :mod:`prac.engine.reconstruct`: one token's "massive activation" would otherwise decide alone).

Greedy in rounds: each round scores every remaining block against the current model, drops the
cheapest half of those still to drop (at least one), and the next round scores the model without them;
the hidden states at every block's input are kept for a round, so a candidate ``i`` costs a forward
through the blocks after ``i`` only. The rounds' scores are the report's ``depth_rounds``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prac.model.blocks import BlockInputs, capture_block_inputs, find_blocks, run_block

log = logging.getLogger(__name__)


@dataclass
class DepthRecord:
    """One greedy round: the blocks still in the model (original indices), each one's score (the
    relative change of the held-out output without it), and the blocks dropped in this round."""

    blocks: list[int]
    scores: list[float]
    dropped: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "scores": [round(s, 6) for s in self.scores], "dropped": self.dropped}


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder()
    return getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or nn.Identity()


def _through(blocks: list[nn.Module], inputs: BlockInputs, hidden: list[torch.Tensor], device: torch.device,
             keep: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``hidden`` (one tensor per batch) through ``blocks`` in order; ``keep`` gets the input of each.
    One block on ``device`` at a time: each goes back to the CPU once its batches have run (the
    model may not fit on the accelerator)."""
    h = list(hidden)
    for block in blocks:
        if keep is not None:
            keep.append(h)
        home = next(block.parameters()).device
        block.to(device)
        h = [run_block(block, BlockInputs([x], [inputs.args[j]], [inputs.kwargs[j]]), 0, device).to(x.device)
             for j, x in enumerate(h)]
        block.to(home)
    return h


def final_outputs(model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The final norm's output (what the head reads) on ``tokens`` ``[n, seqlen]``, one tensor per batch (CPU)."""
    found = find_blocks(model)
    store = torch.device("cpu")
    with torch.no_grad():
        inputs = capture_block_inputs(model, found, tokens.split(max(1, batch_size)), device, store)
        norm = _final_norm(model).to(device)
        try:
            return [norm(x.to(device)).to(store) for x in _through(list(found.modules), inputs, inputs.hidden, device)]
        finally:
            for block in found.modules:
                block.to(store)
            norm.to(store)


def output_change(out: list[torch.Tensor], ref: list[torch.Tensor], norm: nn.Module | None = None,
                  device: torch.device = torch.device("cpu")) -> float:  # noqa: B008 (immutable)
    """Mean over tokens of ``‖out_t − ref_t‖² / ‖ref_t‖²`` (``norm`` applied to ``out`` first)."""
    total, count = 0.0, 0
    for o, r in zip(out, ref):
        o = o.to(device)
        a, b = (norm(o) if norm is not None else o).double(), r.to(device).double()
        per = (a - b).square().sum(-1) / b.square().sum(-1).clamp_min(1e-30)
        total += float(per.sum())
        count += per.numel()
    return total / max(count, 1)


@torch.no_grad()
def choose_blocks_to_drop(model: nn.Module, tokens: torch.Tensor, drop: int, batch_size: int,
                          device: torch.device) -> tuple[list[int], list[DepthRecord]]:
    """The ``drop`` blocks (original indices, ascending) whose removal changes the output on ``tokens``
    ``[n, seqlen]`` least, chosen greedily in rounds (module docstring), and the rounds' records."""
    found = find_blocks(model)
    blocks = list(found.modules)
    store = torch.device("cpu")
    inputs = capture_block_inputs(model, found, tokens.split(max(1, batch_size)), device, store)
    norm = _final_norm(model).to(device)
    alive = list(range(len(blocks)))
    dropped: list[int] = []
    records: list[DepthRecord] = []
    try:
        while len(dropped) < drop:
            at: list[list[torch.Tensor]] = []
            ref = [norm(x.to(device)).to(store) for x in _through([blocks[i] for i in alive], inputs, inputs.hidden,
                                                                  device, keep=at)]
            scores = []
            for k in range(len(alive)):
                rest = [blocks[i] for i in alive[k + 1:]]
                scores.append(output_change(_through(rest, inputs, at[k], device), ref, norm, device))
            take = max(1, math.ceil((drop - len(dropped)) / 2))
            order = sorted(range(len(alive)), key=lambda k: (scores[k], k))[:take]
            chosen = sorted(alive[k] for k in order)
            records.append(DepthRecord(list(alive), scores, chosen))
            log.info("depth round %d: dropping blocks %s (output change %s)", len(records), chosen,
                     ", ".join(f"{scores[k]:.4g}" for k in sorted(order)))
            dropped += chosen
            alive = [i for i in alive if i not in chosen]
    finally:
        for block in blocks:
            block.to(store)
        norm.to(store)
    return sorted(dropped), records
