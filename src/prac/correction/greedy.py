"""Greedy fixed-step correction on stored token samples, with early stopping.

With ``H = XₛᵀXₛ / n`` from the sample and the row's current difference ``d = w - w_orig``, the
row's error is ``E = dᵀ H d`` and its gradient-like vector is ``g = H d``. Changing weight ``j`` by
``δ`` changes the error by exactly

    ΔE = 2 δ g_j + δ² H_jj,

so no ``X Wᵀ`` is ever recomputed. Each row visits its candidates in order (weakest first); at each it
tries ``δ = -sign(g_j) · correction_magnitude · |w_orig_j|`` (the direction that lowers ``E``), keeps it
only if ``ΔE < 0`` (then ``g += δ H[:, j]``), and stops after ``patience`` rejections in a row.
All rows advance together: the loop is over the candidate rank, never over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from prac.core.errors import PracError
from prac.correction.base import (
    MAX_ACTIVATION_SAMPLES,
    PERCENT_CHANGE,
    SELECTION_STRATEGY,
    Correction,
    LayerProblem,
    Proposal,
    SelectionSettings,
    invalid,
)
from prac.correction.objective import sample_hessian, sparse_quadratic_rows
from prac.correction.selection import candidate_order
from prac.model.stats import StatsSpec

_CHECK_EVERY = 16


@dataclass
class GreedyOutcome:
    delta: torch.Tensor  # fp32 [out, in]
    candidates: int  # selected (w, j) pairs over all rows
    visited: int  # candidates tried before each row stopped
    corrected: int  # accepted steps
    rows_stopped_early: int  # rows that ran out of patience before their last candidate
    quad: torch.Tensor  # δᵢᵀ H δᵢ per row (fp32 [out]) for the ``h`` the search ran on
    trace: list[float] | None = None  # Σᵢ Eᵢ after each rank step (only when asked)


def greedy_delta(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    selected: torch.Tensor,
    scores: torch.Tensor,
    h: torch.Tensor,
    step: float,
    patience: int,
    trace: bool = False,
    hd: torch.Tensor | None = None,
) -> GreedyOutcome:
    """Run the greedy search; ``h`` is the sample Hessian, ``step`` the relative step size.

    ``hd`` is ``(w_orig - w_pruned) @ h`` when the caller already has it (saves one product).
    Only ``g`` at each row's own candidates is ever read, so only those K entries per row are kept
    and updated (``g_S += δ H[j, S]``: a gather of [out, K] per step instead of an [out, in] update).
    ``δᵀ H δ`` is tracked alongside (``+= 2 δ (Hδ)_j + δ² H_jj``, with ``Hδ = g + H d``).
    """
    idx, valid = candidate_order(scores, selected, ascending=True)
    rows = torch.arange(w_orig.shape[0], device=w_orig.device)
    d = w_pruned - w_orig
    g_full = d @ h if hd is None else -hd
    err = torch.linalg.vecdot(g_full, d)
    g = g_full.gather(1, idx)  # g at each row's candidates, in visiting order
    hd_s = -g  # (H (w_orig - w_pruned)) at the candidates: Hδ = g + H(w_orig - w_pruned)
    del g_full
    diag_h = torch.diagonal(h)
    delta = torch.zeros_like(w_orig)
    quad = torch.zeros_like(err)
    active = torch.ones(w_orig.shape[0], dtype=torch.bool, device=w_orig.device)
    streak = torch.zeros(w_orig.shape[0], dtype=torch.int64, device=w_orig.device)
    visits = torch.zeros_like(streak)
    corrected = torch.zeros((), dtype=torch.int64, device=w_orig.device)
    history = [float(err.sum())] if trace else None
    for t in range(idx.shape[1]):
        if t % _CHECK_EVERY == 0 and t and not bool(active.any()):
            break  # every row is out of patience; the check syncs, so not on every step
        j = idx[:, t]
        live = valid[:, t] & active
        g_j = g[:, t]
        size = step * w_orig[rows, j].abs()
        move = -torch.sign(g_j) * size
        h_jj = diag_h[j]
        change = 2.0 * move * g_j + move.square() * h_jj
        accept = live & (change < 0)
        move = torch.where(accept, move, 0.0)
        quad += 2.0 * move * (g_j + hd_s[:, t]) + move.square() * h_jj
        delta[rows, j] += move
        g += move.unsqueeze(1) * h[j.unsqueeze(1), idx]  # H symmetric: row j is column j
        err += torch.where(accept, change, 0.0)
        streak = torch.where(accept, 0, streak + live.to(streak.dtype))
        active &= streak < patience
        visits += live.to(visits.dtype)
        corrected += accept.sum()
        if history is not None:
            history.append(float(err.sum()))
    counts = valid.sum(dim=1)
    return GreedyOutcome(
        delta=delta,
        candidates=int(counts.sum()),
        visited=int(visits.sum()),
        corrected=int(corrected),
        rows_stopped_early=int(((~active) & (visits < counts)).sum()),
        quad=quad,
        trace=history,
    )


@dataclass(frozen=True)
class GreedySettings(SelectionSettings):
    """``greedy``: the weakest 5% of each row's survivors, fixed steps of 1% of |w|, patience 8.

    Patience 8: at the default step patience 2 already matched no early stopping on the measured
    layers (docs/correction.md); 8 leaves a margin at no cost, since the loop runs over rank
    positions for all rows at once and ends early only once every row has stopped.
    """

    selection_strategy: str = field(default="weakest", metadata=SELECTION_STRATEGY)
    percent_change: float = field(default=0.05, metadata=PERCENT_CHANGE)
    correction_magnitude: float = field(default=0.01, metadata={
        "flag": "--correction-magnitude", "help": "greedy step, fraction of |w_orig|"})
    max_activation_samples: int = field(default=8192, metadata=MAX_ACTIVATION_SAMPLES)
    patience: int = field(default=8, metadata={
        "flag": "--patience", "min": 1, "help": "greedy: stop a row after this many rejections in a row"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.correction_magnitude) and self.correction_magnitude > 0.0):
            raise invalid(f"correction-magnitude must be > 0, got {self.correction_magnitude}")
        if self.max_activation_samples < 1:
            raise invalid(f"max-activation-samples must be >= 1, got {self.max_activation_samples}")
        if self.patience < 1:
            raise invalid(f"patience must be >= 1, got {self.patience}")


def propose(problem: LayerProblem, settings: GreedySettings) -> Proposal:
    stats, meter = problem.group.stats, problem.meter
    if stats.samples is None or stats.samples.shape[0] == 0:
        raise PracError("correction method 'greedy' needs stored token samples; collect stats with stats_spec(config)")
    # The meter's matrix (and its H d) is the sample's when errors are measured on the sample, or
    # when the sample holds every calibration token (then it is H itself, up to rounding).
    own = problem.error_source == "samples" or int(stats.samples.shape[0]) == stats.count
    device = problem.w_orig.device
    hs = meter.h if own else problem.group.shared("sample_hessian", lambda: sample_hessian(stats.samples.to(device)))
    run = greedy_delta(problem.w_orig, problem.w_pruned, problem.selected, problem.scores, hs,
                       settings.correction_magnitude, settings.patience, hd=meter.dh if own else None)
    quad = run.quad if own else sparse_quadratic_rows(run.delta, meter.h, problem.selected)
    info = {
        "candidates": run.candidates,
        "positions_visited": run.visited,
        "positions_corrected": run.corrected,
        "corrected_pct": 100.0 * run.corrected / max(run.candidates, 1),
        "rows_stopped_early": run.rows_stopped_early,
        "samples": int(stats.samples.shape[0]),
    }
    return Proposal(run.delta, quad, info)


ENTRY = Correction(
    name="greedy", settings=GreedySettings, propose=propose,
    stats=lambda s, exact_errors, seed: StatsSpec(hessian=exact_errors, max_samples=s.max_activation_samples, seed=seed),
    description="fixed-step direct-error search over the weakest survivors, on stored token samples",
)
