"""The contract between the pruning pipeline and the correction methods.

A correction method is a pure function

    fn(w_orig, w_pruned, mask, stats, scores, config) -> CorrectionResult

- ``w_orig``   fp32 [out, in]: the dense weight.
- ``w_pruned`` fp32 [out, in]: the weight the mask source produced (zeros where ``mask``).
- ``mask``     bool [out, in]: True = pruned. Pruned entries stay exactly zero; the mask never changes.
- ``stats``    :class:`prac.stats.InputStats` of the layer's input (hessian / samples present when
               :func:`stats_spec` asked for them).
- ``scores``   fp32 [out, in]: Wanda scores |W|·||X||₂ used to rank survivors for selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("none", "full", "diagonal", "greedy", "optimal")
STRATEGIES = ("top", "moderate", "weakest", "kneedle", "all")


@dataclass(frozen=True)
class CorrectionConfig:
    """Settings of every correction method (names follow the design notes)."""

    method: str = "none"
    selection_strategy: str | None = None  # None: the method's own default
    percent_change: float | None = None  # None: the method's own (full 0.2, others 0.05)
    damping: float | None = None  # None: the method's own default (relative to mean diag(H))
    max_correction_magnitude: float | None = None  # None: the method's own (full 0.2, diagonal 0.05); inf: no clamp
    correction_magnitude: float = 0.01
    max_activation_samples: int = 8192
    patience: int = 8
    layer_batch_size: int = 0  # 0: every layer of a block at once
    optimal_tol: float = 1e-2  # the method's own solve; the yardstick always solves to YARDSTICK_TOL
    optimal_max_iter: int = 200
    measure: bool = True  # collect H for exact errors and the optimal yardstick
    seed: int = 0
    solve_memory_mb: int = 1024  # full: memory for one chunk of batched K x K systems


@dataclass
class CorrectionResult:
    weight: torch.Tensor  # fp32 [out, in], zeros where mask
    diagnostics: dict[str, Any] = field(default_factory=dict)
