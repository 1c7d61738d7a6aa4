"""Full-Hessian correction: the exact least-squares change of each row's selected weights.

For row ``i`` with selected set ``S`` (and ``d = w_orig - w_pruned``, nonzero only where pruned),

    (H_SS + λI) δ_S = H_S,: d        (δ = 0 outside S)

is the minimiser of ``(d - δ)ᵀ H (d - δ) + λ‖δ‖²``: the output error left after the change, with a
ridge on the change itself. Rows have different ``S`` (masks differ per row), so each row's system
is padded to the largest ``k`` with identity rows and zero right-hand side (the padding solves to
exactly 0) and all rows of a chunk are solved by one batched Cholesky. ``cholesky_ex`` reports
each failing row, which is re-solved by minimum-norm least squares and counted.
"""

from __future__ import annotations

import torch

from prac.correction.selection import candidate_order

FALLBACK = "min-norm lstsq (pseudo-inverse by eigh)"
# Bytes per padded K x K entry: the gathered block (4), its linear gather index (8), the Cholesky
# factor (4), the where/eye temporaries (8), rounded up for the fallback's eigendecomposition.
_BYTES_PER_ENTRY = 32


def rows_per_chunk(k_max: int, memory_bytes: int) -> int:
    """How many rows' K x K systems fit in ``memory_bytes`` at once (at least one)."""
    return max(1, memory_bytes // max(1, k_max * k_max * _BYTES_PER_ENTRY))


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares for symmetric ``a`` [c, K, K]; the same on every device.

    ``torch.linalg.lstsq`` only has the full-rank ``gels`` driver on CUDA, which is exactly the
    case that fails here, so the pseudo-inverse of the symmetric matrix is used instead.
    """
    return (torch.linalg.pinv(a, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)


def solve_rows(
    h: torch.Tensor,
    rhs: torch.Tensor,
    selected: torch.Tensor,
    scores: torch.Tensor,
    lam: float,
    memory_bytes: int,
) -> tuple[torch.Tensor, int]:
    """Solve ``(H_SS + λI) δ_S = rhs_S`` for every row's selected set ``S``.

    ``rhs`` is fp32 [out, in] (``d @ H`` for the full method). Returns δ [out, in] (zero outside
    ``selected``) and the number of rows whose Cholesky failed or gave non-finite values.
    Rows whose fallback is still non-finite (NaN statistics) get δ = 0.
    """
    out_features = selected.shape[0]
    idx, valid = candidate_order(scores, selected, ascending=False)
    delta = torch.zeros_like(rhs)
    k_max = idx.shape[1]
    if k_max == 0:
        return delta, 0
    failures = torch.zeros((), dtype=torch.int64, device=rhs.device)
    step = rows_per_chunk(k_max, memory_bytes)
    eye = torch.eye(k_max, dtype=rhs.dtype, device=rhs.device)
    for start in range(0, out_features, step):  # chunks bound memory; rows inside are batched
        ii, vv = idx[start : start + step], valid[start : start + step]
        pair = vv.unsqueeze(2) & vv.unsqueeze(1)
        a = torch.where(pair, h[ii.unsqueeze(2), ii.unsqueeze(1)], 0.0)
        # λ on real entries, 1 on padding: padded rows become identity rows with zero RHS.
        a = a + eye * torch.where(vv, lam, 1.0).to(a.dtype).unsqueeze(2)
        b = rhs[start : start + step].gather(1, ii) * vv
        factor, info = torch.linalg.cholesky_ex(a)
        x = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)
        bad = (info != 0) | ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            fixed = _lstsq(a[bad], b[bad])
            x[bad] = torch.where(torch.isfinite(fixed).all(dim=1, keepdim=True), fixed, 0.0)
            failures += bad.sum()
        delta[start : start + step].scatter_(1, ii, x * vv)
    return delta, int(failures)


def full_delta(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    selected: torch.Tensor,
    scores: torch.Tensor,
    h: torch.Tensor,
    lam: float,
    memory_bytes: int,
) -> tuple[torch.Tensor, int]:
    """The full method's unclamped δ [out, in] and its solve-failure count."""
    rhs = (w_orig - w_pruned) @ h
    return solve_rows(h, rhs, selected, scores, lam, memory_bytes)
