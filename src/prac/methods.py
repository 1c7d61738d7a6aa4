"""Mask sources: pluggable functions ``(weight, stats, pattern, config) -> MaskResult``.

Each takes the dense fp32 weight ``[out, in]`` and the statistics of its input and returns the
pruned weight (exact zeros where the mask is True) — SparseGPT also updates the survivors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from prac.errors import PracError
from prac.masks import apply_mask, magnitude_scores, mask_from_scores, wanda_scores
from prac.patterns import Pattern
from prac.stats import InputStats


@dataclass(frozen=True)
class MethodSettings:
    """Settings a mask source may read."""

    scope: str = "row"  # magnitude/wanda comparison group: "row" or "layer"
    blocksize: int = 128  # sparsegpt
    percdamp: float = 0.01  # sparsegpt


@dataclass
class MaskResult:
    weight: torch.Tensor  # fp32 [out, in], zeros where mask
    mask: torch.Tensor  # bool [out, in], True = pruned
    info: dict[str, Any] = field(default_factory=dict)


MaskFn = Callable[[torch.Tensor, "InputStats | None", Pattern, MethodSettings], MaskResult]


@dataclass(frozen=True)
class Method:
    fn: MaskFn
    needs_stats: bool
    needs_hessian: bool
    description: str


def magnitude(weight: torch.Tensor, stats: InputStats | None, pattern: Pattern, settings: MethodSettings) -> MaskResult:
    mask = mask_from_scores(magnitude_scores(weight), pattern, settings.scope)
    return MaskResult(apply_mask(weight, mask), mask)


def wanda(weight: torch.Tensor, stats: InputStats | None, pattern: Pattern, settings: MethodSettings) -> MaskResult:
    if stats is None:
        raise RuntimeError("wanda needs input statistics")
    mask = mask_from_scores(wanda_scores(weight, stats.l2), pattern, settings.scope)
    return MaskResult(apply_mask(weight, mask), mask)


def sparsegpt(weight: torch.Tensor, stats: InputStats | None, pattern: Pattern, settings: MethodSettings) -> MaskResult:
    from prac.sparsegpt import SparseGPTConfig, sparsegpt_prune

    if stats is None or stats.hessian is None:
        raise RuntimeError("sparsegpt needs the input Hessian")
    result = sparsegpt_prune(weight, stats.hessian, pattern, SparseGPTConfig(settings.blocksize, settings.percdamp))
    return MaskResult(result.weight, result.mask, dict(result.diagnostics))


METHODS: dict[str, Method] = {
    "magnitude": Method(magnitude, False, False, "|W|, per row (or per layer with --scope layer)"),
    "wanda": Method(wanda, True, False, "|W|·||X||₂ compared within each output row"),
    "sparsegpt": Method(sparsegpt, True, True, "OBS-style pruning with weight updates (Frantar & Alistarh 2023)"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PracError(f"unknown pruning method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
