"""Diagonal (first-moment) correction: O(in) memory, no Hessian.

The input is modelled by its mean ``μ`` alone (James–Stein shrunk, see
:func:`prac.correction.objective.james_stein_mean`). Row ``i`` then has the mean output error
``eᵢ = (w_prunedᵢ - w_origᵢ) · μ``, and the smallest change of the selected weights that cancels it
(ridge ``λ``) is

    δ_S = -eᵢ μ_S / (‖μ_S‖² + λ).

It ignores every second-moment interaction, so it can make the true output error worse (zero-mean
features, misleading means); the caller's never-worse check catches that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prac.correction.base import (
    DAMPING,
    MAX_ACTIVATION_SAMPLES,
    MAX_CORRECTION_MAGNITUDE,
    PERCENT_CHANGE,
    SELECTION_STRATEGY,
    Correction,
    LayerProblem,
    Proposal,
    SelectionSettings,
    check_clamp,
    check_damping,
    invalid,
)
from prac.correction.objective import clamp_delta, damping_lambda, james_stein_mean, sparse_quadratic_rows
from prac.model.stats import StatsSpec


def diagonal_delta(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    selected: torch.Tensor,
    mu: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The diagonal method's unclamped δ [out, in] (zero outside ``selected``)."""
    e = (w_pruned - w_orig) @ mu
    mu_sq_sel = selected.to(mu.dtype) @ mu.square()
    denom = mu_sq_sel + lam
    # A row whose selected means are all zero (and λ = 0) has no direction to move in.
    scale = torch.where(denom > 0, -e / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    return (scale.unsqueeze(1) * mu.unsqueeze(0)) * selected


@dataclass(frozen=True)
class DiagonalSettings(SelectionSettings):
    """``diagonal``: the moderate 5% of each row's survivors, δ clamped to 5% of |w|.

    The method itself needs only O(in) statistics (the input mean). With exact errors on (the
    default) the group's H is collected anyway, to measure the error before and after on every
    token; without them the never-worse check uses ``max_activation_samples`` stored tokens.
    """

    selection_strategy: str = field(default="moderate", metadata=SELECTION_STRATEGY)
    percent_change: float = field(default=0.05, metadata=PERCENT_CHANGE)
    damping: float = field(default=1e-2, metadata=DAMPING)
    max_correction_magnitude: float = field(default=0.05, metadata=MAX_CORRECTION_MAGNITUDE)
    max_activation_samples: int = field(default=8192, metadata=MAX_ACTIVATION_SAMPLES)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_damping(self.damping)
        check_clamp(self.max_correction_magnitude)
        if self.max_activation_samples < 1:
            raise invalid(f"max-activation-samples must be >= 1, got {self.max_activation_samples}")


def propose(problem: LayerProblem, settings: DiagonalSettings) -> Proposal:
    stats, device = problem.group.stats, problem.w_orig.device
    mu = james_stein_mean(stats).to(device)
    lam = damping_lambda(stats.sumsq.to(device) / max(stats.count, 1), settings.damping)
    delta = diagonal_delta(problem.w_orig, problem.w_pruned, problem.selected, mu, lam)
    delta, clamped = clamp_delta(delta, problem.w_orig, problem.selected, settings.max_correction_magnitude)
    quad = sparse_quadratic_rows(delta, problem.meter.h, problem.selected)
    return Proposal(delta, quad, {"lambda": lam, "clamped": clamped})


def _stats(settings: DiagonalSettings, exact_errors: bool, seed: int) -> StatsSpec:
    # Without H the never-worse check needs some second-moment data: the O(samples · in) token sample.
    return StatsSpec(hessian=exact_errors, max_samples=0 if exact_errors else settings.max_activation_samples, seed=seed)


ENTRY = Correction(
    name="diagonal", settings=DiagonalSettings, propose=propose, stats=_stats, clamps=True,
    description="first-moment (James-Stein mean) correction of each row's mean output error",
)
