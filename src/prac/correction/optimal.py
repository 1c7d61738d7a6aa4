"""The exact optimum of the correction objective over a free set, by batched preconditioned CG.

For every row ``i`` with free set ``F`` (all survivors for the ``optimal`` method) and
``d = w_orig - w_pruned``, solve

    (H_FF + λI) δ_F = H_F,: d,         w = w_pruned + δ,

the minimiser of ``(d - δ)ᵀ H (d - δ) + λ‖δ‖²`` over changes supported on ``F``. With ``λ → 0`` this is
``w_F = H_FF⁻¹ H_F,: w_orig``: the least-squares best any correction can do for this mask.
(The ridge is on the change, not on ``w``, so a large ``λ`` means "no correction" rather than
"shrink every weight toward zero", which would be worse than doing nothing.)

All rows are solved together by conjugate gradients on the masked operator

    A x = free ⊙ (x @ H) + λ x        (x zero outside ``free``)

(one [out, in] x [in, in] matmul per iteration for every row at once), Jacobi-preconditioned by
``1 / (H_jj + λ)``, started from δ = 0 (that is, from ``w_pruned``). A row stops once its relative
residual ``‖b - A x‖ / ‖b‖`` is at most ``tol``; the solve stops when every row has, or at
``max_iter``. Rows are frozen once converged, so later iterations cannot disturb them.

Cost: ``iterations x 2·out·in²`` flops, all in matmuls, against ``out x k³/3`` (k ≈ survivors) for
one Cholesky per row. Measured at 2048 x 2048, 50% sparsity, 2 CPU cores: 32-36 iterations to
1e-4, 13-18 s, against 140-200 s for a per-row Cholesky loop, with the same error to 6 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Convergence needs a host sync; checking every few iterations keeps a GPU busy in between.
_CHECK_EVERY = 4


@dataclass
class PCGOutcome:
    delta: torch.Tensor  # fp32 [out, in], zero outside the free set
    iterations: int
    residual: float  # max over rows of the true relative residual ‖b - A x‖ / ‖b‖
    converged: bool  # every row reached tol (recursive residual) before max_iter


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_pcg(
    h: torch.Tensor,
    rhs: torch.Tensor,
    free: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
) -> PCGOutcome:
    """Solve ``(H_FF + λI) x_F = rhs_F`` for every row at once; ``rhs`` [out, in] is masked to ``free`` here."""
    keep = free.to(rhs.dtype)
    b = rhs * keep

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x @ h) * keep + lam * x

    diag = torch.diagonal(h) + lam
    precond = keep * _safe_div(torch.ones_like(diag), diag).unsqueeze(0)
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond * r
    p = z.clone()
    rz = (r * z).sum(dim=1)
    b_norm = b.norm(dim=1)
    active = _safe_div(r.norm(dim=1), b_norm) > tol
    iterations = 0
    for it in range(max_iter):
        if it % _CHECK_EVERY == 0 and not bool(active.any()):
            break
        ap = apply(p)
        alpha = torch.where(active, _safe_div(rz, (p * ap).sum(dim=1)), 0.0).unsqueeze(1)
        x += alpha * p
        r -= alpha * ap
        z = precond * r
        rz_next = (r * z).sum(dim=1)
        beta = _safe_div(rz_next, rz).unsqueeze(1)
        p = z + beta * p
        rz = rz_next
        active &= _safe_div(r.norm(dim=1), b_norm) > tol
        iterations = it + 1
    # Report the true residual, not the recursively updated one, which drifts in fp32.
    true_rel = _safe_div((b - apply(x)).norm(dim=1), b_norm)
    residual = float(true_rel.max()) if true_rel.numel() else 0.0
    converged = not bool(active.any())  # by the solver's own (recursive) criterion
    return PCGOutcome(delta=x, iterations=iterations, residual=residual, converged=converged)


def optimal_delta(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    free: torch.Tensor,
    h: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
) -> PCGOutcome:
    """δ of the exact (ridge-``λ``) optimum over ``free`` for every row."""
    return masked_pcg(h, (w_orig - w_pruned) @ h, free, lam, tol, max_iter)
