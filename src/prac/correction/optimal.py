"""The exact optimum of the correction objective over a free set, by batched Schur-complement CG.

For every row ``i`` with free set ``F`` (all survivors for the ``optimal`` method), the fixed set
``Q`` = not ``F`` and ``d = w_orig - w_pruned``, solve

    (H_FF + λI) δ_F = H_F,: d,         w = w_pruned + δ,

the minimiser of ``(d - δ)ᵀ H (d - δ) + λ‖δ‖²`` over changes supported on ``F``. With ``λ → 0`` this is
``w_F = H_FF⁻¹ H_F,: w_orig``: the least-squares best any correction can do for this mask.
(The ridge is on the change, not on ``w``, so a large ``λ`` means "no correction" rather than
"shrink every weight toward zero", which would be worse than doing nothing.)

Method: the Schur complement over the fixed set (Optimal Brain Surgeon for many weights at once).
With ``A = H + λI`` and ``G = A⁻¹`` (one Cholesky and inverse per layer, shared by every row: the
same in³-sized work SparseGPT does), the unconstrained optimum is ``u = G H d`` and the constrained
one is

    δ = u - G μ   (restricted to F),      G_QQ μ = u_Q,

with ``μ`` the multipliers of the constraints ``δ_Q = 0``. When ``d`` vanishes on ``F`` (always for a
correction: ``d`` lives on the pruned weights, which are never free), ``H d = A d - λ d`` and the
``-λ d`` term, supported on ``Q``, only shifts the multipliers, so ``u = d`` gives the same ``δ_F``
without the product ``G H d``; the general ``u`` is kept for free sets that overlap ``d``. The
``Q x Q`` systems (a different ``Q`` for every row) are solved together by conjugate gradients on ``μ ↦ Q ⊙ (μ @ G)``: one
[out, in] x [in, in] matmul per iteration for every row at once, with ``G μ`` accumulated alongside
so δ costs nothing extra. Preconditioner: Jacobi, ``1 / G_qq`` (the OBS denominators). Start:
``μ = 0``, that is, the unconstrained optimum.

Why this formulation (measured on bench/layer_speed.py's correlated, outlier-scaled activations,
1024 inputs, 50% Wanda mask, damping 1e-2, iterations to a relative residual of 1e-4):

- CG on the system above, Jacobi-preconditioned (the previous solver): 36-40 iterations; its
  scaled matrix inherits the activations' ill-conditioning.
- The same with the preconditioner ``P G P`` (P = projection on F; exact when F is everything):
  17 iterations, but each costs two matmuls (``H`` and ``G``).
- Schur complement with ``Q A Q`` as preconditioner (one ``A`` and one ``G`` matmul): 17.
- Schur complement, Jacobi: 11-12 of one matmul each. The scaled ``G_QQ`` has its eigenvalues in
  about [0.2, 1.8] (condition 5-9, the finite-sample noise of ``H``), so CG gains 2-2.5x per
  iteration, and 99% of the optimum's error reduction takes 3-4 iterations.

Tolerance: a row is done when the relative residual of the *original* masked system,
``‖b - (H_FF + λI) δ_F‖ / ‖b‖`` with ``b = (H d)_F``, is at most ``tol``; that true residual (max
over rows) is what :class:`PCGOutcome` reports. Computing it costs a matmul, so it is checked only
when the Schur residual (free every iteration), scaled per row by the last measured ratio of the
two (0.3-2 in practice), says every remaining row is done, and every ``_PROGRESS_EVERY`` iterations.
Rows a check confirms are frozen and leave the batch; the rest go on. A host sync per iteration.

Fallbacks, never silent (``PCGOutcome.solver`` / ``.fallback``, and a logged warning):

- the Cholesky of ``H + λI`` fails (``λ = 0`` with a dead input, numerically singular), or its
  pivots show a condition number beyond 1/eps of fp32 (so ``G`` would carry no correct digit):
  every row is solved by the previous method, Jacobi-PCG on the system above (operator
  ``x ↦ F ⊙ (x @ H) + λx``, preconditioner ``1 / (H_jj + λ)``), which needs no factorisation;
- rows whose true residual stops following the Schur residual (``G`` too inaccurate in fp32, or a
  ``tol`` at fp32's floor for that row) are finished by the same Jacobi-PCG, warm-started from their
  current δ. ``iterations`` then counts both.

Cost: the inverse of ``H + λI`` (about in³ flops), one matmul per iteration and one per residual
check (usually one or two), each ``2·out·in²`` flops; ``H d`` comes from the caller, whose error
bookkeeping needs it anyway, and each residual check also yields ``δᵀ H δ`` for that bookkeeping.

Measured iteration counts, times and fractions of the optimum per layer size are in
docs/correction.md (they drift with hardware; the reasons above do not). Tolerance 1e-2 (the
default) gives the same fraction of the optimum as 1e-4 to three digits: what is left of the
optimum is the damping's, not the solver's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from prac.core.linalg import DampedFactor, damped_cholesky, symmetric_inverse
from prac.correction.base import (
    DAMPING,
    PERCENT_CHANGE,
    SELECTION_STRATEGY,
    Correction,
    LayerProblem,
    Proposal,
    SelectionSettings,
    check_damping,
    invalid,
)
from prac.correction.objective import require_hessian
from prac.model.stats import StatsSpec

log = logging.getLogger(__name__)

# Jacobi-PCG (the fallback) checks convergence only every few iterations: a host sync, and
# checking every few iterations keeps a GPU busy in between.
_CHECK_EVERY = 4
# Schur solve: every this many iterations the true residual is checked whether or not the Schur
# residual asks for it; a row whose true residual did not at least halve since the previous such
# check (healthy rows gain 10-1000x) has stalled: (H + λI)⁻¹ is too inaccurate in fp32.
_PROGRESS_EVERY = 8
# ... and so has a row the Schur residual called done this many times without the true residual
# agreeing (usually the first or second check confirms a row). Stalled rows go to Jacobi-PCG.
_MAX_ASKED_CHECKS = 3


@dataclass
class PCGOutcome:
    delta: torch.Tensor  # fp32 [out, in], zero outside the free set
    iterations: int
    residual: float  # max over rows of the true relative residual ‖b - A x‖ / ‖b‖ of the original system
    converged: bool  # every row reached tol before max_iter
    solver: str = "jacobi-pcg"  # "schur-pcg", "schur-pcg+jacobi-pcg" (some rows polished), "jacobi-pcg"
    fallback: str = ""  # why a fallback ran ("" when none did)
    quad: torch.Tensor | None = None  # δᵢᵀ H δᵢ per row (fp32 [out]), from the solver's last product
    stalled_rows: int = 0  # rows the Schur solve could not finish (finished by Jacobi-PCG)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_pcg(
    h: torch.Tensor,
    rhs: torch.Tensor,
    free: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
    x0: torch.Tensor | None = None,
) -> PCGOutcome:
    """Jacobi-PCG for ``(H_FF + λI) x_F = rhs_F``, every row at once; ``rhs`` [out, in] is masked to ``free``.

    Starts from ``x0`` (masked to ``free``; zero when None). A row stops when ``‖b - A x‖ / ‖b‖ ≤ tol``.
    """
    keep = free.to(rhs.dtype)
    b = rhs * keep

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x @ h) * keep + lam * x

    diag = torch.diagonal(h) + lam
    precond = keep * _safe_div(torch.ones_like(diag), diag).unsqueeze(0)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0 * keep
        r = b - apply(x)
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
    ax = apply(x)
    true_rel = _safe_div((b - ax).norm(dim=1), b_norm)
    residual = float(true_rel.max()) if true_rel.numel() else 0.0
    converged = not bool(active.any())  # by the solver's own (recursive) criterion
    quad = torch.linalg.vecdot(x, ax - lam * x)  # x is zero outside F, so xᵀ(F ⊙ xH) = xᵀHx
    return PCGOutcome(delta=x, iterations=iterations, residual=residual, converged=converged, quad=quad)


def _inverse(h: torch.Tensor, lam: float) -> tuple[torch.Tensor | None, float, str]:
    """``(H + λI)⁻¹`` (symmetric fp32) and a lower bound on its condition number, or None and why not."""
    return _unpack(damped_cholesky(h, lam, 1.0, symmetric_inverse))


def _unpack(factor: DampedFactor) -> tuple[torch.Tensor | None, float, str]:
    why = factor.reason
    if why and "λ =" not in why:
        why = f"{why[:-1]}, λ = {factor.lam:.3g})" if why.endswith(")") else f"{why} (λ = {factor.lam:.3g})"
    return factor.value, factor.cond, why


def _schur_pcg(
    h: torch.Tensor,
    g: torch.Tensor,
    cond: float,
    d: torch.Tensor,
    hd: torch.Tensor,
    free: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
    warn: bool = True,
) -> PCGOutcome:
    """Schur-complement CG (see the module docstring), with Jacobi-PCG polishing of stalled rows."""
    keep_all = free.to(hd.dtype)
    b_norm_all = (hd * keep_all).norm(dim=1)
    if bool(((d != 0) & free).any()):
        u_all = hd @ g  # the unconstrained optimum G H d
    else:  # d lives on the fixed set: u = d gives the same δ_F (see the module docstring), no product
        u_all = d
    delta = torch.zeros_like(hd)
    rel = torch.zeros_like(b_norm_all)  # the true relative residual of every finished row
    quad = torch.zeros_like(b_norm_all)  # δᵢᵀ H δᵢ of every finished row
    rho0_all = (u_all * (1.0 - keep_all)).norm(dim=1)
    # b = 0: δ = 0 is exact. Nothing fixed (ρ₀ = 0): δ = u_F is exact, μ = 0.
    trivial = (b_norm_all > 0) & (rho0_all == 0)
    idx = ((b_norm_all > 0) & (rho0_all > 0)).nonzero().flatten()
    inv_diag = _safe_div(torch.ones_like(torch.diagonal(g)), torch.diagonal(g)).unsqueeze(0)

    def true_residual(
        x: torch.Tensor, hd_: torch.Tensor, keep: torch.Tensor, b_norm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The relative residual of the original system and xᵀHx, per row, from one product."""
        xh = x @ h
        res = _safe_div(((hd_ - xh) * keep - lam * x).norm(dim=1), b_norm)
        return res, torch.linalg.vecdot(x, xh)

    def take(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        everything = (u_all, keep_all, hd, b_norm_all, rho0_all)
        if rows.numel() == hd.shape[0]:  # no copies (these are only read)
            return everything
        return tuple(t[rows] for t in everything)

    if bool(trivial.any()):
        delta[trivial] = (u_all * keep_all)[trivial]
        rel[trivial], quad[trivial] = true_residual(
            delta[trivial], hd[trivial], keep_all[trivial], b_norm_all[trivial]
        )
    iterations = 0
    stalled = torch.zeros(0, dtype=torch.long, device=hd.device)
    if idx.numel():
        u, keep, hd_a, b_norm, rho0 = take(idx)
        fixed = 1.0 - keep
        rho = u * fixed  # Schur residual u_Q - G_QQ μ, at μ = 0
        y = torch.zeros_like(u)  # G μ
        z = rho * inv_diag
        p = z.clone()
        rz = torch.linalg.vecdot(rho, z)
        ratio = torch.ones_like(b_norm)  # true relative residual / Schur relative residual, per row
        last = torch.ones_like(b_norm)  # true residual at the last progress check (1: that of δ = 0)
        tries = torch.zeros_like(b_norm)  # checks the Schur residual asked for, per row
        since = 0  # iterations since the last progress check
        while idx.numel():
            gp = p @ g
            # p is zero outside Q, so pᵀ(Q ⊙ Gp) = pᵀGp.
            alpha = _safe_div(rz, torch.linalg.vecdot(p, gp)).unsqueeze(1)
            y.addcmul_(gp, alpha)
            rho.addcmul_(gp, alpha, value=-1.0).mul_(fixed)
            z = rho * inv_diag
            rz_next = torch.linalg.vecdot(rho, z)
            p.mul_(_safe_div(rz_next, rz).unsqueeze(1)).add_(z)
            rz = rz_next
            iterations += 1
            since += 1
            schur_rel = _safe_div(rho.norm(dim=1), rho0)
            asked = bool((schur_rel * ratio <= tol).all())
            progress = since >= _PROGRESS_EVERY
            out_of_budget = iterations >= max_iter
            if not (asked or progress or out_of_budget):
                continue
            x = (u - y) * keep
            res, xhx = true_residual(x, hd_a, keep, b_norm)
            done = res <= tol
            stuck = torch.zeros_like(done)
            if progress:
                stuck |= ~done & (res > 0.5 * last)
                last, since = res, 0
            if asked:
                tries += 1
                stuck |= ~done & (tries >= _MAX_ASKED_CHECKS)
            if out_of_budget:
                stuck.zero_()
            finished = done | stuck | out_of_budget
            delta[idx[finished]] = x[finished]
            rel[idx[finished]] = res[finished]
            quad[idx[finished]] = xhx[finished]
            stalled = torch.cat([stalled, idx[stuck]])
            if bool(finished.all()):
                break
            go = (~finished).nonzero().flatten()
            ratio = _safe_div(res, schur_rel)[go].clamp(min=1e-3)
            idx, last, tries = idx[go], last[go], tries[go]
            u, keep, hd_a, b_norm, rho0 = u[go], keep[go], hd_a[go], b_norm[go], rho0[go]
            fixed, rho, y, p, rz = fixed[go], rho[go], y[go], p[go], rz[go]

    solver, fallback = "schur-pcg", ""
    polished = torch.zeros_like(rel, dtype=torch.bool)
    polished[stalled] = True
    converged = bool((rel[~polished] <= tol).all())
    if stalled.numel():
        fallback = (
            f"{stalled.numel()} row(s) stopped converging in the Schur solve ((H + λI)⁻¹ inaccurate in fp32, "
            f"condition number ≥ {cond:.2g}); finished by Jacobi-PCG"
        )
        (log.warning if warn else log.debug)("optimal correction: %s", fallback)
        # Warm-start from the Schur iterate unless it is worse than no change at all.
        start = delta[stalled] * (rel[stalled] < 1.0).to(delta.dtype).unsqueeze(1)
        polish = masked_pcg(h, hd[stalled], free[stalled], lam, tol, max(max_iter - iterations, 1), x0=start)
        delta[stalled] = polish.delta
        rel[stalled], quad[stalled] = true_residual(
            polish.delta, hd[stalled], keep_all[stalled], b_norm_all[stalled]
        )
        iterations += polish.iterations
        converged = converged and polish.converged
        solver = "schur-pcg+jacobi-pcg"
    residual = float(rel.max()) if rel.numel() else 0.0
    return PCGOutcome(
        delta=delta,
        iterations=iterations,
        residual=residual,
        converged=converged,
        solver=solver,
        stalled_rows=int(stalled.numel()),
        fallback=fallback,
        quad=quad,
    )


def optimal_delta(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    free: torch.Tensor,
    h: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
    hd: torch.Tensor | None = None,
    inverse: DampedFactor | None = None,
    warn: bool = True,
) -> PCGOutcome:
    """δ of the exact (ridge-``λ``) optimum over ``free`` for every row (see the module docstring).

    ``hd`` is ``(w_orig - w_pruned) @ H`` when the caller already has it (saves one product);
    ``inverse`` is ``(H + λI)⁻¹`` for this ``λ`` when the input group already has it (shared by
    every linear of the group). ``warn=False`` logs fallbacks at DEBUG only (a pipeline reports
    them once per run, with counts; the outcome always names them).
    """
    d = w_orig - w_pruned
    if hd is None:
        hd = d @ h
    g, cond, why = _inverse(h, lam) if inverse is None else _unpack(inverse)
    if g is None:
        (log.warning if warn else log.debug)(
            "optimal correction: %s; solving with Jacobi-PCG on the original system instead", why)
        outcome = masked_pcg(h, hd, free, lam, tol, max_iter)
        outcome.fallback = why
        return outcome
    return _schur_pcg(h, g, cond, d, hd, free, lam, tol, max_iter, warn)


@dataclass(frozen=True)
class OptimalSettings(SelectionSettings):
    """``optimal``: every survivor, the exact masked least-squares optimum with ridge ``damping``
    (× mean diag H), solved to a relative residual ``tol`` in at most ``max_iter`` CG iterations.

    Damping 1e-2 costs about 0.1% of the in-sample reduction and protects short calibration sets
    from overfitting (docs/correction.md); tol 1e-2 loses nothing measurable against 1e-4.
    """

    selection_strategy: str = field(default="all", metadata=SELECTION_STRATEGY)
    percent_change: float = field(default=0.05, metadata=PERCENT_CHANGE)
    damping: float = field(default=1e-2, metadata=DAMPING)
    tol: float = field(default=1e-2, metadata={
        "flag": "--optimal-tol",
        "help": "optimal: relative residual at which a row's solve stops (default: {defaults}: the same fraction of "
                "the optimum as 1e-4 to 3 digits, in 30-40% less time)"})
    max_iter: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        check_damping(self.damping)
        if not (math.isfinite(self.tol) and self.tol > 0.0):
            raise invalid(f"optimal tolerance must be > 0, got {self.tol}")
        if self.max_iter < 1:
            raise invalid(f"optimal max iterations must be >= 1, got {self.max_iter}")


def propose(problem: LayerProblem, settings: OptimalSettings) -> Proposal:
    """The optimum over the selected set, with the group's shared ``(H + λI)⁻¹``."""
    require_hessian(problem, "optimal")
    inverse = problem.group.inverse(settings.damping)
    outcome = optimal_delta(problem.w_orig, problem.w_pruned, problem.selected, problem.meter.h, inverse.lam,
                            settings.tol, settings.max_iter, hd=problem.meter.dh, inverse=inverse, warn=False)
    info = {
        "lambda": inverse.lam,
        "solver_iterations": outcome.iterations,
        "solver_residual": outcome.residual,
        "solver_converged": outcome.converged,
        "solver": outcome.solver,
        "solver_fallback": outcome.fallback,
        "solver_stalled_rows": outcome.stalled_rows,
    }
    return Proposal(outcome.delta, outcome.quad, info, optimum=outcome)


ENTRY = Correction(
    name="optimal", settings=OptimalSettings, propose=propose,
    stats=lambda s, exact_errors, seed: StatsSpec(hessian=True, seed=seed),
    description="the exact masked least-squares optimum over all survivors (Schur-complement CG)",
)
