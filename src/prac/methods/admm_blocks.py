"""Block-sequential ADMM (``--admm-sweep blocks``): SparseGPT's column sweep with each column block's
mask and values chosen by ADMM, at a few times SparseGPT's cost (3-5x per layer on one CPU thread
with ``final="none"``, docs/admm.md) instead of the global method's 25-30x.

Why. The global ADMM (:mod:`prac.methods.admm`) iterates on the whole ``out x in`` matrix: every iteration is
at least one ``out·in²`` matmul, which is SparseGPT's whole cost, so 20 iterations can never come
near SparseGPT's time (measured 29x per layer at in 4096 on one CPU thread, docs/admm.md).

What. With ``A = H + λI`` (SparseGPT's damping) and ``U`` the upper Cholesky factor of ``A⁻¹``
(SparseGPT's shared factor), columns are visited in blocks ``B`` of ``blocksize``, left to right,
as in SparseGPT. When block ``B`` is reached, the columns left of it are final and the columns
right of it (``R``) are free. Choosing the block's values ``t`` with the best compensation of ``R``
costs ``(w_B − t) G (w_B − t)ᵀ`` per row, with the block's Schur quadratic

    G = ((A_FF)⁻¹_BB)⁻¹ = (U_BBᵀ U_BB)⁻¹         F = B ∪ R,

which comes from ``U_BB`` alone (``cholesky_inverse`` of ``U_BBᵀ``, no new factorisation). On that
b x b quadratic, normalised to a unit diagonal (so ``|x|`` is the block's OBS saliency), the same
ADMM as the global method runs with the same settings (``iterations``, ``penalty``,
``penalty_growth``, ``damping``, ``gradual``, ``score``, ``scope``): it chooses the block's mask and
values jointly, each iteration a ``out x b x b`` matmul. The sparse iterate's values are then made
exact for the block's mask by a few Jacobi-PCG steps on the same b x b system (``polish``). The
compensation of ``R`` is SparseGPT's lazy update with ``Err = (w_B − t) U_BB⁻¹``:
``W_R −= Err · U_BR``, and ``Σ Err²`` is the exact increase of the damped objective.

Budget. ``scope="layer"``: every block gets the pattern's fraction of its entries, all rows
together (as SparseGPT's per-block threshold); ``"row"``: each row its share in every block. N:M
patterns are per group of M columns and need ``blocksize`` to be a multiple of M.

Cost per linear: SparseGPT's (one shared factorisation, the lazy updates: about one ``out·in²``
matmul) plus ``iterations`` matmuls of ``out x b x b`` per block (about ``2·iterations·b/in`` of one
``out·in²`` matmul: 1.25 at b = 128, in = 4096) and a b x b eigendecomposition per block. The exact
final solve on the mask (``final="exact"``, as the global method does) costs 3-8 more such matmuls;
``final="none"`` keeps the sweep's weights.

What it gives up. The mask is chosen block by block, greedily left to right, with a fixed budget per
block: the global method's mask can move weight between blocks and rows of the whole matrix. On
the bundled model (in 256 and 768) the layer error at 70% sits between the global ADMM's and
SparseGPT's; on a synthetic layer of in 4096 its mask is no better than SparseGPT's (the optimum on
either mask within 0.3%), so there the gain is only in the values, which SparseGPT + ``optimal``
reaches too (docs/admm.md has the numbers).
"""

from __future__ import annotations

from typing import Any

import torch

from prac.correction.optimal import masked_pcg
from prac.methods.admm import ADMMSettings, gradual_sparsity, project
from prac.methods.patterns import NM, Pattern

POLISH_ITERATIONS = 8  # Jacobi-PCG steps on each block's masked b x b system (at most), ...
POLISH_TOL = 1e-4  # ... or until its relative residual is this


def block_admm(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, pattern: Pattern,
               settings: ADMMSettings) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Sweep ``weight`` [out, in] (fp32, not modified) with the factor ``upper`` (``(H + λI)⁻¹ =
    UᵀU``); returns the swept weights (zero where pruned and on ``dead`` inputs), the mask (True =
    pruned) and diagnostics (``error_estimate``: Σ Err², the objective increase for the damped H)."""
    rows, cols = weight.shape
    bs = settings.blocksize
    if isinstance(pattern, NM) and bs % pattern.m:
        raise ValueError(f"admm blocksize {bs} must be a multiple of M={pattern.m}")
    w = weight.clone()
    w[:, dead] = 0.0
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    target = pattern.target_sparsity
    lam = settings.damping
    error = torch.zeros((), dtype=w.dtype, device=w.device)
    changes = 0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        ubb = upper[i1:i2, i1:i2]
        g = torch.cholesky_inverse(ubb.t())  # (U_BBᵀ U_BB)⁻¹: the block's Schur quadratic
        e = g.diagonal().clamp_min(0).sqrt()
        e = torch.where(e > 0, e, torch.ones_like(e))
        gs = g / e.unsqueeze(0) / e.unsqueeze(1)
        values, vectors = torch.linalg.eigh(gs)
        values = values.clamp_min(0)
        x0 = w[:, i1:i2] * e.unsqueeze(0)
        b = x0 @ gs + lam * x0
        inv_e = 1.0 / e

        # called only within this iteration; the default binds this block's inv_e explicitly (B023)
        def scores_of(x: torch.Tensor, inv_e: torch.Tensor = inv_e) -> torch.Tensor:
            return x.abs() if settings.score == "scaled" else x.abs() * inv_e.unsqueeze(0)

        m = project(scores_of(x0), pattern, gradual_sparsity(target, 0, settings.gradual), settings.scope)
        z = x0.masked_fill(m, 0.0)
        u = torch.zeros_like(x0)
        rho = settings.penalty
        for step in range(settings.iterations):
            # (Gs + (λ+ρ)I)⁻¹ formed once per step (b x b), then one out x b x b matmul.
            inv = (vectors / (values + lam + rho)) @ vectors.t()
            x = (b + rho * (z - u)) @ inv
            new = project(scores_of(x + u), pattern, gradual_sparsity(target, step, settings.gradual), settings.scope)
            if step == settings.iterations - 1:
                changes += int((new != m).sum())
            m = new
            z = (x + u).masked_fill(m, 0.0)
            u = u + x - z
            rho *= settings.penalty_growth
        # The exact values on the block's mask, from the sparse iterate.
        # (No ridge here: the ridge steadies the mask search; the values are the block's optimum.)
        polished = masked_pcg(gs, x0 @ gs, ~m, 0.0, POLISH_TOL, POLISH_ITERATIONS, x0=z).delta.masked_fill(m, 0.0)
        t = polished * inv_e.unsqueeze(0)
        err = torch.linalg.solve_triangular(ubb, w[:, i1:i2] - t, upper=True, left=False)
        error += err.square().sum()
        if i2 < cols:
            w[:, i2:].addmm_(err, upper[i1:i2, i2:], alpha=-1)
        w[:, i1:i2] = t
        mask[:, i1:i2] = m
    w[:, dead] = 0.0
    info = {"admm_sweep": "blocks", "admm_blocksize": bs, "admm_blocks": -(-cols // bs),
            "admm_mask_changes_last": changes, "error_estimate": float(error)}
    return w, mask, info
