"""Pruning scores and masks: pure tensor functions, no model code.

Masks are boolean tensors shaped like the weight ``[out_features, in_features]`` with
**True = pruned** (the convention of the golden reference masks). Scores are "keep"
scores: the lowest-scoring weights are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prac.methods.patterns import NM, Pattern, Unstructured

SCOPES = ("row", "layer")
#: The ``--scope`` flag of every method with a ``scope`` setting (field metadata, see
#: :mod:`prac.cli.settings_flags`): the comparison group of :func:`mask_from_scores`.
SCOPE = {"flag": "--scope", "choices": SCOPES, "help": "comparison group for unstructured masks"}


@dataclass
class MaskResult:
    """What a mask source returns: the pruned weight, its mask, and the method's diagnostics."""

    weight: torch.Tensor  # fp32 [out, in], zeros where mask
    mask: torch.Tensor  # bool [out, in], True = pruned
    info: dict[str, Any] = field(default_factory=dict)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """Wanda's |W_ij| * ||X_j||_2: weight magnitude times the L2 norm of its input channel.

    ``input_l2`` is ``[in_features]``; any positive common scale (sqrt of a sum or of a mean of
    squares) gives the same per-row ranking.
    """
    if input_l2.shape != (weight.shape[1],):
        raise ValueError(f"input_l2 has shape {tuple(input_l2.shape)}, expected ({weight.shape[1]},)")
    return weight.abs().float() * input_l2.float().reshape(1, -1)


def prune_count(width: int, sparsity: float) -> int:
    """How many of ``width`` weights an unstructured ``sparsity`` prunes (rounded to nearest)."""
    return int(round(width * sparsity))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest entries of every row of ``scores`` [rows, n], ties taken in column order.

    The same set as the first ``k`` of a stable ascending sort, found in O(n) per row: every entry
    below the row's k-th value, then the leftmost entries equal to it until there are ``k``.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < threshold
    need = k - below.sum(dim=1, keepdim=True)
    tied = scores == threshold
    return below | (tied & (tied.cumsum(dim=1) <= need))


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, scope: str = "row") -> torch.Tensor:
    """Prune the lowest scores under ``pattern``.

    - ``Unstructured`` with ``scope="row"``: ``round(in * sparsity)`` weights of every output row
      (Wanda's comparison group); ``scope="layer"``: ``round(numel * sparsity)`` over the whole matrix.
    - ``NM(n, m)``: in every group of ``m`` consecutive inputs of a row, keep the ``n`` highest.

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if isinstance(pattern, NM):
        pattern.check(cols)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.m - pattern.n]
        return mask.reshape(rows, cols // pattern.m, pattern.m).scatter_(-1, order, True).reshape(rows, cols)
    if not isinstance(pattern, Unstructured):
        raise TypeError(f"unknown pattern {pattern!r}")
    if scope == "row":
        return lowest_k(scores, prune_count(cols, pattern.sparsity))
    if scope == "layer":
        return lowest_k(scores.reshape(1, -1), prune_count(rows * cols, pattern.sparsity)).reshape(rows, cols)
    raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with the pruned entries set to exactly zero."""
    return weight.masked_fill(mask, 0)
