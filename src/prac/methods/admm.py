"""ADMM pruning: the mask chosen together with the weights, on the layer's reconstruction objective.

Problem (one linear, calibration inputs X, dense weight W₀, H = XᵀX / N): find W of the sparsity
pattern minimising ``Σᵢ (wᵢ − w₀ᵢ)ᵀ (H + λI) (wᵢ − w₀ᵢ)``. The ridge λ (``damping``) is on the change,
as in prac's ``optimal`` correction: a large λ means "keep the dense weights", never "shrink them".

Splitting (Boyd et al.'s ADMM for a nonconvex projection, as in Boža 2024 and ALPS 2024): keep a
dense iterate W, a sparse iterate Z and a scaled dual U, and repeat

    W ← (B + ρ(Z − U)) (H + (λ + ρ)I)⁻¹          B = W₀ (H + λI)
    Z ← Π(W + U)                                  the projection onto the pattern
    U ← U + W − Z

with a penalty ρ that grows (``penalty_growth``) so W and Z are pulled together. Π re-chooses the
mask every iteration from the scores of W + U, so weights and mask are found jointly; with
``gradual`` the sparsity of Π ramps up cubically over the first iterations (Zhu & Gupta's schedule,
as the reference ADMM code does) so early masks can still change their mind.

Work is done in the scaled coordinates W̃ = W·D, H̃ = D⁻¹HD⁻¹ with D = diag(√H_jj): H̃ has a unit
diagonal, so ρ and λ are scale-free, and |W̃| is Wanda's score — the default projection score
(``score="scaled"``; ``"magnitude"`` ranks |W| instead).

Every iteration is two matmuls: with H̃ = VΛVᵀ computed once per *input group* (shared by q/k/v or
gate/up, through :class:`prac.model.group.InputGroup`), ``(H̃ + cI)⁻¹ = V diag(1/(Λ + c)) Vᵀ`` for every
penalty c at no further factorisation. After the last iteration the final mask's weights are
solved exactly (``optimal``'s Schur-complement CG on the group's shared damped inverse): the ADMM
iterate only has to find the mask.

Where prac departs from the reference code (fmfi-compbio/admm-pruning): the penalty may grow
(the reference keeps ρ = 1), the gradual schedule applies to whole-matrix and per-row scopes and to
N:M alike, the damping is a ridge on the change, and the final weights are the exact masked
least-squares optimum instead of the last projection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prac.core.errors import PracError
from prac.methods.masks import SCOPE, MaskResult, mask_from_scores
from prac.methods.patterns import NM, Pattern, Unstructured
from prac.methods.sparsegpt import BLOCKSIZE

SCORES = ("scaled", "magnitude")
SWEEPS = ("global", "blocks")
FINALS = ("exact", "none")


@dataclass(frozen=True)
class ADMMSettings:
    """Settings of ``--method admm`` (defaults measured on the bundled model, see docs/admm.md).

    ``iterations``: ADMM steps; ``penalty``: the first ρ (relative to the unit diagonal of H̃);
    ``penalty_growth``: ρ is multiplied by this after every step; ``damping``: the ridge λ on the
    change (relative); ``gradual``: steps over which the projection's sparsity ramps up (0: the
    full sparsity from the first step); ``score``: the projection's ranking; ``scope``: ``layer``
    (one budget per matrix, the default, as ALPS and the reference) or ``row`` (each output row its
    share); ``final_damping``/``final_tol``/``final_max_iter``: the exact solve on the final mask.
    ``sweep``: ``global`` (the ADMM iterates on the whole matrix, the default) or ``blocks`` (SparseGPT's
    column sweep with each block of ``blocksize`` columns chosen by ADMM, :mod:`prac.methods.admm_blocks`:
    about SparseGPT's cost); ``final``: ``exact`` (the exact solve on the final mask) or ``none`` (keep
    the sweep's weights; ``blocks`` only, whose sweep already compensates every pruned block).
    """

    iterations: int = field(default=20, metadata={"flag": "--admm-iterations", "min": 1, "help": "admm: ADMM steps"})
    penalty: float = field(default=0.1, metadata={
        "flag": "--admm-penalty", "help": "admm: first penalty ρ, relative to the unit diagonal of the scaled H"})
    penalty_growth: float = field(default=1.2, metadata={
        "flag": "--admm-penalty-growth", "help": "admm: ρ multiplied by this after every step"})
    damping: float = field(default=0.1, metadata={"flag": "--admm-damping", "help": "admm: ridge λ on the change, relative"})
    gradual: int = field(default=0, metadata={
        "flag": "--admm-gradual", "help": "admm: steps over which the projection's sparsity ramps up cubically, 0 = none"})
    score: str = field(default="scaled", metadata={
        "flag": "--admm-score", "choices": SCORES, "help": "admm: projection score, |W|·√diag(H) (scaled, Wanda's) or |W|"})
    scope: str = field(default="layer", metadata=SCOPE)
    final_damping: float = field(default=1e-2, metadata={
        "flag": "--admm-final-damping", "help": "admm: ridge of the exact solve on the final mask, fraction of mean "
                                                "diag(H); larger keeps the weights nearer the dense ones"})
    final_tol: float = 1e-2
    final_max_iter: int = 200
    sweep: str = field(default="global", metadata={
        "flag": "--admm-sweep", "choices": SWEEPS,
        "help": "admm: global (ADMM on the whole matrix, best quality, ~25-30x SparseGPT's time per layer on a CPU) or "
                "blocks (SparseGPT's column sweep, each --blocksize block's mask and values by ADMM: 3-5x SparseGPT "
                "with --admm-final none, ~8-17x without; docs/admm.md)"})
    blocksize: int = field(default=128, metadata=BLOCKSIZE)
    final: str = field(default="exact", metadata={
        "flag": "--admm-final", "choices": FINALS,
        "help": "admm: exact (solve the final mask's weights exactly) or none (keep the block sweep's weights: "
                "--admm-sweep blocks only, saves 3-8 matmuls of in x in per linear)"})

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise PracError(f"admm iterations must be >= 1, got {self.iterations}")
        if not self.penalty > 0 or not self.penalty_growth >= 1:
            raise PracError(f"admm penalty must be > 0 and its growth >= 1, got {self.penalty}, {self.penalty_growth}")
        if not self.damping >= 0 or not self.final_damping >= 0:
            raise PracError(f"admm damping must be >= 0, got {self.damping}, {self.final_damping}")
        if not 0 <= self.gradual <= self.iterations:
            raise PracError(f"admm gradual must be in [0, iterations], got {self.gradual}")
        if self.score not in SCORES:
            raise PracError(f"admm score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.scope not in ("row", "layer"):
            raise PracError(f"admm scope must be row or layer, got {self.scope!r}")
        if not self.final_tol > 0 or self.final_max_iter < 1:
            raise PracError("admm final tolerance must be > 0 and its iterations >= 1")
        if self.sweep not in SWEEPS:
            raise PracError(f"admm sweep must be one of {', '.join(SWEEPS)}, got {self.sweep!r}")
        if self.blocksize < 1:
            raise PracError(f"admm blocksize must be >= 1, got {self.blocksize}")
        if self.final not in FINALS:
            raise PracError(f"admm final must be one of {', '.join(FINALS)}, got {self.final!r}")
        if self.final == "none" and self.sweep == "global":
            raise PracError("admm final none needs sweep blocks (the global iterate is only a mask finder)")

    @property
    def sweeps_blocks(self) -> bool:
        """``sweep`` blocks: the columns are swept in blocks of ``blocksize``."""
        return self.sweep == "blocks"


@dataclass
class Spectrum:
    """H̃ = D⁻¹HD⁻¹ = VΛVᵀ and D: what every linear of an input group shares."""

    scale: torch.Tensor  # D = √diag(H), 0 on dead inputs
    h_scaled: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor
    attempts: int = 1  # one eigendecomposition (counted with the group's factorisations)


def spectrum(h: torch.Tensor) -> Spectrum:
    """The scaled H and its eigendecomposition (float32; eigenvalues clamped at 0)."""
    diag = torch.diagonal(h).clamp_min(0)
    scale = diag.sqrt()
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    hs = h * inv.unsqueeze(0) * inv.unsqueeze(1)
    values, vectors = torch.linalg.eigh(hs)
    return Spectrum(scale, hs, values.clamp_min(0), vectors)


def gradual_sparsity(target: float, step: int, ramp: int) -> float:
    """Zhu & Gupta's cubic ramp: ``target · (1 − (1 − (step+1)/ramp)³)`` for the first ``ramp`` steps."""
    if ramp <= 0 or step + 1 >= ramp:
        return target
    return target * (1.0 - (1.0 - (step + 1) / ramp) ** 3)


def project(scores: torch.Tensor, pattern: Pattern, sparsity: float, scope: str) -> torch.Tensor:
    """The mask (True = pruned) of ``pattern`` at the current ``sparsity`` of its ramp.

    N:M while ramping: of each group's M − N lowest (the N:M candidates), only those among the
    lowest ``sparsity · numel`` scores overall are pruned; at the full ramp this is exact N:M.
    """
    if isinstance(pattern, NM):
        candidates = mask_from_scores(scores, pattern)
        target = pattern.target_sparsity
        if sparsity >= target:
            return candidates
        ranked = scores.masked_fill(~candidates, float("inf"))
        return candidates & mask_from_scores(ranked, Unstructured(sparsity), "layer")
    return mask_from_scores(scores, Unstructured(sparsity), scope)


def admm_mask(weight: torch.Tensor, spec: Spectrum, pattern: Pattern, settings: ADMMSettings,
              frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Run the ADMM iterations on one linear; returns the final mask, the last sparse iterate Z
    (unscaled, zeros where pruned) and diagnostics. ``frozen``: a fixed mask (no re-projection)."""
    scale = spec.scale
    wt = weight.to(spec.h_scaled.dtype) * scale.unsqueeze(0)
    lam = settings.damping
    b = wt @ spec.h_scaled + lam * wt  # W̃₀ (H̃ + λI)
    vt = spec.vectors.T
    target = pattern.target_sparsity
    inv_scale = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))

    def scores_of(x: torch.Tensor) -> torch.Tensor:
        return x.abs() if settings.score == "scaled" else x.abs() * inv_scale.unsqueeze(0)

    mask = (frozen if frozen is not None
            else project(scores_of(wt), pattern, gradual_sparsity(target, 0, settings.gradual), settings.scope))
    z = wt.masked_fill(mask, 0.0)
    u = torch.zeros_like(wt)
    rho = settings.penalty
    changes = []
    w = wt
    for step in range(settings.iterations):
        coeff = 1.0 / (spec.values + lam + rho)
        w = ((b + rho * (z - u)) @ spec.vectors * coeff) @ vt
        if frozen is None:
            new = project(scores_of(w + u), pattern, gradual_sparsity(target, step, settings.gradual), settings.scope)
            changes.append(int((new != mask).sum()))
            mask = new
        z = (w + u).masked_fill(mask, 0.0)
        u = u + w - z
        rho *= settings.penalty_growth
    info = {"admm_iterations": settings.iterations, "admm_final_penalty": rho / settings.penalty_growth,
            "admm_mask_changes_last": changes[-1] if changes else 0,
            "admm_primal_residual": float((w - z).norm() / wt.norm().clamp_min(1e-30))}
    return mask, z * inv_scale.unsqueeze(0), info


def admm_prune(weight: torch.Tensor, group, pattern: Pattern, settings: ADMMSettings) -> MaskResult:
    """``--method admm`` for one linear of ``group`` (see the module docstring)."""
    from prac.correction.objective import LayerError
    from prac.correction.optimal import optimal_delta

    start = time.perf_counter()
    w0 = weight.float()
    if pattern.target_sparsity == 0:
        return MaskResult(w0.clone(), torch.zeros_like(w0, dtype=torch.bool), {"skipped": "sparsity 0"})
    if group is None or group.stats is None or group.stats.hessian is None:
        raise RuntimeError("admm needs the input Hessian")
    h = group.hessian()
    if settings.sweep == "blocks":
        from prac.methods.admm_blocks import block_admm
        from prac.methods.registry import shared_factor

        factor = shared_factor(group, device=w0.device)
        swept, mask, info = block_admm(w0, factor.upper, factor.dead, pattern, settings)
        if settings.final == "none":
            row = mask.float().mean(dim=1)
            info.update(final_solver="none", row_sparsity_min=float(row.min()), row_sparsity_max=float(row.max()),
                        seconds=time.perf_counter() - start)
            return MaskResult(swept, mask, info)
    else:
        spec = group.factor(("admm-eigh",), lambda: spectrum(h))
        mask, _z, info = admm_mask(w0, spec, pattern, settings)
    pruned = w0.masked_fill(mask, 0.0)
    inverse = group.inverse(settings.final_damping)
    meter = LayerError.of(w0, pruned, h)
    outcome = optimal_delta(w0, pruned, ~mask, h, inverse.lam, settings.final_tol, settings.final_max_iter,
                            hd=meter.dh, inverse=inverse, warn=False)
    final = (pruned + outcome.delta).masked_fill(mask, 0.0)
    row = mask.float().mean(dim=1)
    info.update(final_solver=outcome.solver, final_iterations=outcome.iterations, final_residual=outcome.residual,
                final_converged=outcome.converged, final_stalled_rows=outcome.stalled_rows,
                row_sparsity_min=float(row.min()), row_sparsity_max=float(row.max()),
                seconds=time.perf_counter() - start)
    return MaskResult(final, mask, info)
