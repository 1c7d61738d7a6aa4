"""Which gradient coordinates each pass over the samples fills: blocks planned, cut into pieces, packed.

A block's *plan* is its kept coordinates (all, or a uniform subsample of ``max_params_per_block``).
In memory, one pass holds every block whole. Streaming, each plan's coordinates are cut into pieces of
at most ``width`` columns and the pieces packed, in block order, into passes of at most ``width``
columns; each pass recomputes the per-sample gradients of just the parameters its pieces touch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prac.spectral import blocks as blk
from prac.spectral.config import SpectralConfig


@dataclass(frozen=True)
class Plan:
    """A block with its kept coordinates (None = all) and their count."""

    block: blk.Block
    used: torch.Tensor | None
    seed: int | None

    @property
    def width(self) -> int:
        return self.block.n_params if self.used is None else int(self.used.numel())


@dataclass(frozen=True)
class Piece:
    """Columns [start, stop) of a block's kept coordinates, and where each parameter's part goes."""

    plan: Plan
    start: int
    stop: int
    parts: tuple[tuple[str, slice | torch.Tensor, slice], ...]  # (param, its flat coords, piece columns)

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def names(self) -> list[str]:
        return [p[0] for p in self.parts]


def plan_block(block: blk.Block, cfg: SpectralConfig) -> Plan:
    """All of the block's coordinates, or a seeded uniform subsample of ``cfg.max_params_per_block``."""
    if cfg.max_params_per_block is None or block.n_params <= cfg.max_params_per_block:
        return Plan(block, None, None)
    seed = blk.block_seed(cfg.seed, block.key)
    return Plan(block, blk.subsample_indices(block.n_params, cfg.max_params_per_block, seed), seed)


def pieces(plan: Plan, width: int | None) -> list[Piece]:
    """Cut a block's kept coordinates into pieces of at most ``width`` columns (None: one piece)."""
    total = plan.width
    step = total if width is None else width
    offsets = np.cumsum((0,) + plan.block.numels)
    out = []
    for start in range(0, max(total, 1), max(step, 1)):
        stop = min(start + step, total)
        parts = []
        for j, name in enumerate(plan.block.names):
            lo, hi = int(offsets[j]), int(offsets[j + 1])
            if plan.used is None:
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    parts.append((name, slice(a - lo, b - lo), slice(a - start, b - start)))
            else:
                sel = plan.used[start:stop]
                a = int(torch.searchsorted(sel, lo))
                b = int(torch.searchsorted(sel, hi))
                if a < b:
                    parts.append((name, sel[a:b] - lo, slice(a, b)))
        out.append(Piece(plan, start, stop, tuple(parts)))
    return out


def plan_passes(plans: Sequence[Plan], width: int | None) -> list[list[Piece]]:
    """In memory: one pass with every block. Streaming: pieces packed into passes of ≤ width columns."""
    if width is None:
        return [[pc for p in plans for pc in pieces(p, None)]]
    out: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for plan in plans:
        for piece in pieces(plan, width):
            if current and used + piece.width > width:
                out.append(current)
                current, used = [], 0
            current.append(piece)
            used += piece.width
    if current:
        out.append(current)
    return out
