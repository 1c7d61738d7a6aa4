"""Correcting one pruned linear, the same way for every method.

Select the survivors the method may change (``selection.py``), let the method propose δ, keep it only
if the layer's error drops ("never worse"; a layer with nothing to repair is "unchanged"), and —
with exact errors on — measure how much of the achievable reduction it reached: the yardstick is the
``optimal`` solve over all survivors, nearly undamped (``YARDSTICK_DAMPING``), on the group's H and
its shared factorisation.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from prac.correction.base import (
    YARDSTICK_DAMPING,
    YARDSTICK_MAX_ITER,
    YARDSTICK_TOL,
    CorrectionConfig,
    CorrectionResult,
    LayerProblem,
)
from prac.correction.objective import LayerError, error_matrix
from prac.correction.optimal import PCGOutcome, optimal_delta
from prac.correction.registry import get_correction
from prac.correction.selection import select
from prac.group import InputGroup
from prac.stats import InputStats, StatsSpec


def stats_spec(cfg: CorrectionConfig) -> StatsSpec:
    """What :class:`InputStats` must collect for ``cfg`` (the method's needs, and H for exact errors)."""
    entry = get_correction(cfg.method)
    if entry is None:
        return StatsSpec(seed=cfg.seed)
    return entry.stats(cfg.settings, cfg.exact_errors, cfg.seed)


def _as_group(stats: InputStats | InputGroup, device: torch.device) -> InputGroup:
    return stats if isinstance(stats, InputGroup) else InputGroup(["layer"], stats, device)


def correct(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    mask: torch.Tensor,
    stats: InputStats | InputGroup,
    scores: torch.Tensor,
    cfg: CorrectionConfig,
) -> CorrectionResult:
    """Correct one pruned linear; see the module docstring. Pure: inputs are not modified.

    ``stats`` is the layer's :class:`InputGroup` (whose H and factorisations are shared with the
    other linears reading the same input) or bare :class:`InputStats`. ``method="none"`` returns
    ``w_pruned`` itself (no copy) with empty diagnostics.
    """
    entry = get_correction(cfg.method)
    if entry is None:
        return CorrectionResult(weight=w_pruned, diagnostics={})
    if not (w_orig.shape == w_pruned.shape == mask.shape == scores.shape):
        raise ValueError(
            f"shapes differ: w_orig {tuple(w_orig.shape)}, w_pruned {tuple(w_pruned.shape)}, "
            f"mask {tuple(mask.shape)}, scores {tuple(scores.shape)}"
        )
    start = time.perf_counter()
    settings = cfg.settings
    device = w_orig.device
    group = _as_group(stats, device)
    w_orig, w_pruned = w_orig.float(), w_pruned.float()
    mask, scores = mask.to(device), scores.to(device)

    h_err, source = error_matrix(group)
    meter = LayerError.of(w_orig, w_pruned, h_err)
    selected = select(scores, mask, settings.selection_strategy, settings.percent_change)
    problem = LayerProblem(w_orig, w_pruned, mask, selected, scores, group, meter, source)
    proposal = entry.propose(problem, settings)
    delta = proposal.delta.masked_fill(~selected, 0.0)
    candidate = (w_pruned + delta).masked_fill(mask, 0.0)

    gain = meter.reduction(delta, proposal.quad)
    before = meter.relative(meter.before)
    proposed = meter.relative(meter.before - gain)
    accepted = math.isfinite(gain) and gain > 0
    after = proposed if accepted else before
    n_selected = int(selected.sum())
    magnitude = delta.abs()

    diagnostics: dict[str, Any] = {
        "method": cfg.method,
        "strategy": settings.selection_strategy,
        "error_source": source,
        "error_before": before,
        "error_after": after,
        "error_proposed": proposed,
        "reduction": before - after,
        "reduction_pct": 100.0 * (before - after) / before if before > 0 else 0.0,
        "selected": n_selected,
        "delta_mean": float(magnitude.sum()) / max(n_selected, 1),
        "delta_max": float(magnitude.max()) if magnitude.numel() else 0.0,
        "clamped": 0,
        "solve_failures": 0,
    }
    diagnostics.update(proposal.info)
    if hasattr(settings, "damping"):
        diagnostics["damping"] = float(settings.damping)
    if entry.clamps:
        diagnostics["clamp_bound"] = float(settings.max_correction_magnitude)
    diagnostics["clamped_pct"] = 100.0 * diagnostics["clamped"] / max(n_selected, 1)
    if cfg.exact_errors and source == "hessian":
        diagnostics.update(_measure_optimal(mask, meter, group, cfg, proposal.optimum, before, after))
    # A layer with nothing to repair (no error before) is "unchanged", not a failed correction.
    diagnostics["status"] = "accepted" if accepted else ("unchanged" if meter.before <= 0 else "reverted")
    diagnostics["reverted"] = diagnostics["status"] == "reverted"
    diagnostics["seconds"] = time.perf_counter() - start
    return CorrectionResult(weight=candidate if accepted else w_pruned.clone(), diagnostics=diagnostics)


def yardstick(mask: torch.Tensor, meter: LayerError, group: InputGroup, max_iter: int = YARDSTICK_MAX_ITER) -> PCGOutcome:
    """The (nearly) undamped optimum over every survivor, on the group's shared factorisation."""
    inverse = group.inverse(YARDSTICK_DAMPING)
    # optimal_delta only uses the difference w_orig - w_pruned, which is the meter's d.
    return optimal_delta(meter.d, torch.zeros_like(meter.d), ~mask, meter.h, inverse.lam, YARDSTICK_TOL,
                         max_iter, hd=meter.dh, inverse=inverse, warn=False)


def _measure_optimal(
    mask: torch.Tensor,
    meter: LayerError,
    group: InputGroup,
    cfg: CorrectionConfig,
    own: PCGOutcome | None,
    before: float,
    after: float,
) -> dict[str, Any]:
    """The yardstick's optimum, and the fraction of its reduction the correction reached."""
    s = cfg.settings
    reuse = (
        own is not None and s.selection_strategy == "all" and s.damping == YARDSTICK_DAMPING and s.tol <= YARDSTICK_TOL
    )
    best = own if reuse else yardstick(mask, meter, group, getattr(s, "max_iter", YARDSTICK_MAX_ITER))
    optimum = meter.relative(meter.before - meter.reduction(best.delta.masked_fill(mask, 0.0), best.quad))
    achievable = before - optimum
    # Nothing achievable (no pruned weight, or an optimum no better than w_pruned): nothing was missed.
    fraction = (before - after) / achievable if achievable > 0 else 1.0
    return {
        "optimal_error": optimum,
        "fraction_of_optimal": fraction,
        "optimal_iterations": best.iterations,
        "optimal_residual": best.residual,
        "optimal_converged": best.converged,
        "optimal_solver": best.solver,
        "optimal_fallback": best.fallback,
    }
