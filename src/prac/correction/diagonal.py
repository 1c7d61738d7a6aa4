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

import torch


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
