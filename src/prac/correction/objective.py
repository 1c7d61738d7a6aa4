"""The reconstruction objective and the small pieces of math every method shares.

For a layer ``y = x Wᵀ`` and calibration tokens ``X`` (N x in), the output error of a candidate
weight ``W`` is ``‖X Wᵀ - X W_origᵀ‖² / N = Σᵢ dᵢᵀ H dᵢ`` with ``dᵢ = wᵢ - w_origᵢ`` and
``H = XᵀX / N``. It is reported relative to the output energy ``Σᵢ w_origᵢᵀ H w_origᵢ``, so layers
of different scale can be averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prac.core.errors import PracError
from prac.model.stats import InputStats


def quadratic_rows(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dᵢᵀ H dᵢ`` for every row of ``d`` (fp32 [out])."""
    return ((d @ h) * d).sum(dim=1)


def relative_error(w: torch.Tensor, w_orig: torch.Tensor, h: torch.Tensor) -> float:
    """``Σᵢ (wᵢ - w_origᵢ)ᵀ H (wᵢ - w_origᵢ) / Σᵢ w_origᵢᵀ H w_origᵢ``; 0 when the output is all zero."""
    energy = quadratic_rows(w_orig, h).sum()
    err = quadratic_rows(w - w_orig, h).sum()
    return float(err / energy) if float(energy) > 0 else 0.0


def sorted_support(support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's True columns in ascending order, padded: (idx int64 [out, K], valid bool [out, K]).

    ``K`` is the largest row count. Padding slots point at the row's other columns (its first False
    ones), so a row's ``idx`` never repeats a column: scattering into it never collides.
    Ascending columns make gathers from ``H`` read each of its rows front to back, which is 2.5x
    faster on a CPU than the same gather in random order (memory-bound; bench/full_kernels.py).
    """
    counts = support.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    # No sort: a row's j-th True column goes to slot j, its j-th False one to slot count + j (a
    # permutation of the columns per row).
    slot = torch.where(support, support.cumsum(dim=1), counts.unsqueeze(1) + (~support).cumsum(dim=1)) - 1
    cols = torch.arange(support.shape[1], device=support.device).expand_as(slot)
    idx = torch.empty_like(slot).scatter_(1, slot, cols)[:, :width]
    valid = torch.arange(width, device=support.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def sparse_quadratic_rows(delta: torch.Tensor, h: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``δᵢᵀ H δᵢ`` for every row of ``δ`` that is zero outside ``support`` (fp32 [out]).

    Gathers each row's ``H_SS`` when the supports are small (a few percent of the columns, as the
    5% selections of ``diagonal``/``greedy``), which is much cheaper than the dense ``δ @ H``;
    otherwise falls back to the dense product.
    """
    idx, valid = sorted_support(support)
    k = idx.shape[1]
    if k == 0:
        return torch.zeros(delta.shape[0], dtype=torch.float32, device=delta.device)
    if 4 * k > h.shape[0]:
        return quadratic_rows(delta.float(), h)
    x = delta.float().gather(1, idx) * valid
    step = max(1, (64 << 20) // (k * k))  # rows per chunk: a 256 MB gathered block at most
    parts = []
    for start in range(0, x.shape[0], step):
        ii, xx = idx[start : start + step], x[start : start + step]
        block = h[ii.unsqueeze(2), ii.unsqueeze(1)]
        parts.append(torch.linalg.vecdot(xx, (block @ xx.unsqueeze(2)).squeeze(2)))
    return torch.cat(parts)


@dataclass
class LayerError:
    """The output error of one pruned layer and of corrections to it, from products computed once.

    With ``d = w_orig - w_pruned``, the error of ``w_pruned + δ`` is ``(d - δ)ᵀ H (d - δ)`` per row, so

        error(δ) = error_before - (2 δ·(H d) - δᵀ H δ),

    and the reduction in brackets needs only ``H d`` (computed here once, and reused by the methods
    as their right-hand side) and ``δᵀ H δ``, which every method gets cheaply from its own solve.
    The reduction is summed directly, not as a difference of two large errors, so a tiny
    improvement is measured as precisely as a large one (what the never-worse check needs).
    Two products per layer in all: ``w_orig @ H`` (the output energy) and ``d @ H``.
    """

    h: torch.Tensor
    d: torch.Tensor  # w_orig - w_pruned, fp32 [out, in]
    dh: torch.Tensor  # d @ H
    energy: float  # Σᵢ w_origᵢᵀ H w_origᵢ
    before: float  # Σᵢ dᵢᵀ H dᵢ

    @classmethod
    def of(cls, w_orig: torch.Tensor, w_pruned: torch.Tensor, h: torch.Tensor) -> LayerError:
        d = w_orig.float() - w_pruned.float()
        dh = d @ h
        energy = float(quadratic_rows(w_orig.float(), h).double().sum())
        before = float(torch.linalg.vecdot(d, dh).double().sum())
        return cls(h=h, d=d, dh=dh, energy=energy, before=before)

    def relative(self, absolute: float) -> float:
        """An absolute error as a fraction of the output energy (0 when the output is all zero)."""
        return absolute / self.energy if self.energy > 0 else 0.0

    def reduction(self, delta: torch.Tensor, quad_rows: torch.Tensor | None = None) -> float:
        """``error_before - error(δ)``; ``quad_rows`` (``δᵢᵀ H δᵢ``) is computed densely when not given."""
        if quad_rows is None:
            quad_rows = quadratic_rows(delta, self.h)
        linear = torch.linalg.vecdot(delta, self.dh).double().sum()
        return float(2.0 * linear - quad_rows.double().sum())


def sample_hessian(samples: torch.Tensor) -> torch.Tensor:
    """``XₛᵀXₛ / n`` of the stored token sample: the same objective, on the sample's tokens."""
    x = samples.float()
    return (x.T @ x) / max(x.shape[0], 1)


def damping_lambda(diag_h: torch.Tensor, damping: float) -> float:
    """Absolute damping ``λ = damping · mean diag(H)``: relative, so one value fits every layer's scale."""
    return float(damping * diag_h.float().mean()) if diag_h.numel() else 0.0


def clamp_delta(
    delta: torch.Tensor, w_orig: torch.Tensor, selected: torch.Tensor, max_rel: float | None
) -> tuple[torch.Tensor, int]:
    """Clamp ``|δ| ≤ max_rel · |w_orig|`` elementwise; returns the clamped δ and how many entries hit the bound.

    ``max_rel=None`` or ``inf`` disables the clamp. Only selected entries are counted (δ is zero elsewhere).
    """
    if max_rel is None or math.isinf(max_rel):
        return delta, 0
    bound = max_rel * w_orig.abs()
    hit = (delta.abs() > bound) & selected
    return torch.maximum(torch.minimum(delta, bound), -bound), int(hit.sum())


def james_stein_mean(stats: InputStats) -> torch.Tensor:
    """Positive-part James–Stein estimate of the per-feature input mean, shrunk toward the grand mean.

    With ``m_j = Σx_j / N`` (raw means), ``m̄`` their average, the pooled per-token variance
    ``σ² = mean_j(Σx_j² / N - m_j²)`` and so the variance ``σ² / N`` of each ``m_j``:

        c = max(0, 1 - (d - 3) · (σ² / N) / Σ_j (m_j - m̄)²),   μ = m̄ + c · (m - m̄)

    ``c`` lies in [0, 1], so every ``μ_j`` lies between ``m_j`` and ``m̄``. Fewer than four features,
    or identical means, leave the raw means unchanged (James–Stein needs ``d > 3`` to dominate).
    """
    n = max(stats.count, 1)
    m = stats.sum.float() / n
    d = m.numel()
    grand = m.mean()
    spread = (m - grand).square().sum()
    if d <= 3 or float(spread) <= 0.0:
        return m
    pooled_var = (stats.sumsq.float() / n - m.square()).clamp(min=0).mean()
    c = (1.0 - (d - 3) * (pooled_var / n) / spread).clamp(min=0.0, max=1.0)
    return grand + c * (m - grand)


def require_hessian(problem, method: str) -> None:
    """``full``/``optimal`` solve with H, so their errors are measured on it too (source "hessian")."""
    if problem.error_source != "hessian":
        raise PracError(f"correction method {method!r} needs the input Hessian; collect stats with stats_spec(config)")


def error_matrix(group) -> tuple[torch.Tensor, str]:
    """The matrix a layer's before/after errors are measured with, shared by the group, and its source.

    The full Hessian (all calibration tokens) when it was collected, else the stored token sample.
    Without either no method can check that it did not make the layer worse, so that is an error.
    """
    stats = group.stats
    if stats.hessian is not None:
        return group.hessian(), "hessian"
    if stats.samples is not None and stats.samples.shape[0] > 0:
        return group.shared("sample_hessian", lambda: sample_hessian(stats.samples.to(group.device))), "samples"
    raise PracError(
        "correction needs the input's Hessian or stored token samples to measure its error; "
        "collect the statistics with prac.correction.stats_spec(config)"
    )
