"""Damped Cholesky factorisations with retries and a condition check: the one helper every solver uses.

Every Hessian-based method needs ``(H + λI)`` factorised with ``λ = relative · scale`` (``scale`` is
mean diag H, so one relative value fits every layer). What differs is what happens on failure:
SparseGPT retries with ``λ`` grown by ``growth`` (each attempt counted, running out is an error);
``optimal`` makes one attempt and falls back to an iterative solve, naming why. Both use
:func:`damped_cholesky`; the failure count and the reason are returned, never hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DampedFactor:
    """The outcome of :func:`damped_cholesky`.

    ``value``: what ``finish`` made of the factor (None when every attempt failed); ``lam``: the
    absolute damping of the last attempt; ``relative``: its relative value; ``attempts``: how many
    factorisations ran; ``failures``: how many of them failed (``attempts - 1`` on success after
    retries); ``cond``: a lower bound on the condition number of ``H + λI`` from the Cholesky
    pivots, ``(max Lᵢᵢ / min Lᵢᵢ)²``; ``reason``: why the last attempt failed ("" on success).
    """

    value: torch.Tensor | None
    lam: float
    relative: float
    attempts: int
    failures: int
    cond: float
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.value is not None


Finish = Callable[[torch.Tensor, float], "tuple[torch.Tensor | None, str]"]
"""``finish(lower, cond) -> (value, reason)``: turn the factor into what the solver needs (an inverse,
a factor of the inverse) and check it; ``value=None`` with a reason counts as a failed attempt."""


def condition_bound(lower: torch.Tensor) -> float:
    """``(max Lᵢᵢ / min Lᵢᵢ)²``: a lower bound on the condition number of ``L Lᵀ``."""
    pivots = lower.diagonal()
    if pivots.numel() == 0:
        return 1.0
    low = float(pivots.min())
    return float((pivots.max() / pivots.min()) ** 2) if low > 0 else float("inf")


def damped_cholesky(
    h: torch.Tensor,
    relative: float,
    scale: float | torch.Tensor,
    finish: Finish,
    retries: int = 0,
    growth: float = 10.0,
    reverse: bool = False,
) -> DampedFactor:
    """Factorise ``H + λI`` (``λ = relative · scale``), retrying with ``relative · growthᵏ`` on failure.

    ``reverse``: factorise the order-reversed matrix ``J (H + λI) J`` (SparseGPT builds the upper
    factor of the inverse from it). ``h`` is not modified; one working copy is made. A relative
    damping of 0 has nothing to grow, so it gets a single attempt.
    """
    a = h.flip(0, 1).clone() if reverse else h.clone()
    added = 0.0
    attempts = 0
    rel = relative
    reason = ""
    cond = 0.0
    lam = 0.0
    for attempt in range(retries + 1):
        lam = float(rel * scale)  # in the scale's precision, as λ has always been computed
        a.diagonal().add_(lam - added)
        added = lam
        attempts += 1
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            cond = condition_bound(lower)
            value, reason = finish(lower, cond)
            if value is not None:
                return DampedFactor(value, lam, rel, attempts, attempts - 1, cond)
        else:
            reason = f"Cholesky of H + λI failed (λ = {lam:.3g}, leading minor {int(info)} not positive)"
        if rel == 0 or attempt == retries:
            break
        rel *= growth
    return DampedFactor(None, lam, rel, attempts, attempts, cond, reason)


def symmetric_inverse(lower: torch.Tensor, cond: float) -> tuple[torch.Tensor | None, str]:
    """``finish`` for solvers that need ``(H + λI)⁻¹``: refused when not finite or too ill-conditioned."""
    g = torch.cholesky_inverse(lower)
    if not bool(torch.isfinite(g).all()):
        return None, "(H + λI)⁻¹ is not finite"
    if cond * torch.finfo(g.dtype).eps >= 1.0:
        return None, f"H + λI is too ill-conditioned for its inverse in {g.dtype} (condition number ≥ {cond:.2g})"
    return g, ""


def upper_inverse_factor(lower_reversed: torch.Tensor, _cond: float) -> tuple[torch.Tensor | None, str]:
    """``finish`` for SparseGPT: the upper ``U`` with ``(H + λI)⁻¹ = UᵀU`` from the factor of ``J(H + λI)J``.

    With ``J(H + λI)J = L̃L̃ᵀ``, ``U = J L̃⁻¹ J`` is upper triangular with a positive diagonal and
    ``UᵀU = (H + λI)⁻¹``: one factorisation and one triangular inverse.
    """
    eye = torch.eye(lower_reversed.shape[0], dtype=lower_reversed.dtype, device=lower_reversed.device)
    upper = torch.linalg.solve_triangular(lower_reversed, eye, upper=False).flip(0, 1)
    if not bool(torch.isfinite(upper).all()):
        return None, "the inverse factor is not finite"
    return upper, ""
