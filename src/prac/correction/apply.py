"""Correcting one pruned linear, the same way for every method.

Select the survivors the method may change (``selection.py``), let the method propose δ, keep it only
if the layer's error drops ("never worse"; a layer with nothing to repair is "unchanged"), and —
with exact errors on — measure how much of the achievable reduction it reached: the yardstick is the
``optimal`` solve over all survivors, nearly undamped (``YARDSTICK_DAMPING``), on the group's H and
its shared factorisation.

With a held-out share (``Holdout``) the group's statistics are the fit share's alone
(:class:`prac.model.stats.InputStats`): the mask, every candidate δ and the yardstick are fitted on rows the
held-out share never entered, and the held-out share only judges. The report's ``digest`` of each
layer is that of its candidate weights before the judge (:func:`prac.core.digest.digest`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from prac.core.digest import digest
from prac.core.errors import PracError
from prac.correction.base import (
    YARDSTICK_DAMPING,
    YARDSTICK_MAX_ITER,
    YARDSTICK_TOL,
    CorrectionResult,
    LayerProblem,
)
from prac.correction.config import CorrectionConfig
from prac.correction.objective import LayerError, error_matrix
from prac.correction.optimal import PCGOutcome, optimal_delta
from prac.correction.registry import get_correction
from prac.correction.selection import select
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec


def stats_spec(cfg: CorrectionConfig) -> StatsSpec:
    """What :class:`InputStats` must collect for ``cfg`` (the method's needs, and H for exact errors)."""
    entry = get_correction(cfg.method)
    if entry is None:
        return StatsSpec(seed=cfg.seed)
    return dataclasses.replace(entry.stats(cfg.settings, cfg.exact_errors, cfg.seed), holdout=cfg.holdout.share)


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
    split = _held_out_groups(group) if cfg.holdout.active else None
    if split is None:
        proposal = entry.propose(problem, settings)
        delta = proposal.delta.masked_fill(~selected, 0.0)
        gain = meter.reduction(delta, proposal.quad)
        judged: dict[str, Any] = {"holdout": "unavailable"} if cfg.holdout.active else {}
        if cfg.holdout.active:
            judged["digest"] = digest([(w_pruned + delta).masked_fill(mask, 0.0)])
        passed = True
    else:
        settings, proposal, delta, gain, judged = _judge(entry, problem, split, cfg)
        passed = judged["passed"]
    candidate = (w_pruned + delta).masked_fill(mask, 0.0)

    before = meter.relative(meter.before)
    proposed = meter.relative(meter.before - gain) if passed else judged["error_proposed"]
    accepted = passed and math.isfinite(gain) and gain > 0
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
    diagnostics.update({k: v for k, v in judged.items() if k not in ("passed", "error_proposed")})
    if hasattr(settings, "damping"):
        diagnostics["damping"] = float(settings.damping)
    if entry.clamps:
        diagnostics["clamp_bound"] = float(settings.max_correction_magnitude)
    diagnostics["clamped_pct"] = 100.0 * diagnostics["clamped"] / max(n_selected, 1)
    if cfg.exact_errors and source == "hessian":
        # The method's own optimum doubles as the yardstick: both are solved on the group's statistics
        # (the fit share's, with a held-out share).
        diagnostics.update(_measure_optimal(mask, meter, group, settings, proposal.optimum, before, after))
    # A layer with nothing to repair (no error before) is "unchanged", not a failed correction;
    # one whose held-out error would rise is "refused" (its in-sample error fell).
    if accepted:
        status = "accepted"
    elif meter.before <= 0:
        status = "unchanged"
    else:
        status = "refused" if judged.get("refused") else "reverted"
    diagnostics["status"] = status
    diagnostics["reverted"] = status == "reverted"
    diagnostics["refused"] = status == "refused"
    diagnostics["seconds"] = time.perf_counter() - start
    return CorrectionResult(weight=candidate if accepted else w_pruned.clone(), diagnostics=diagnostics)


def _held_out_groups(group: InputGroup) -> tuple[InputGroup, InputGroup] | None:
    """The group's (fit, held-out) shares when both can measure an error of their own; the fit share's
    group is ``group`` itself (its statistics hold no held-out row)."""
    split = group.holdout()
    if split is None:
        return None
    try:
        error_matrix(split[0]), error_matrix(split[1])
    except PracError:  # no token of one share in the stored sample (exact errors off, tiny sample)
        return None
    return split


def _candidates(cfg: CorrectionConfig) -> list[Any]:
    """The method's settings, once per candidate damping of ``cfg.holdout`` (if the method has one),
    its own damping among them."""
    s = cfg.settings
    if not cfg.holdout.dampings or not hasattr(s, "damping"):
        return [s]
    dampings = sorted(set(cfg.holdout.dampings) | {float(s.damping)})
    return [dataclasses.replace(s, damping=d) for d in dampings]


#: Factors of the damping tried, in order, when a correction fails on the held-out share (``Holdout.escalate``).
ESCALATION = (10.0, 100.0, 1000.0)

#: Another damping replaces the method's own only if it lowers the held-out error by more than this
#: fraction: where the held-out errors of the candidates agree, the damping does not matter and the
#: configured one is kept, rather than a winner by noise.
DAMPING_MARGIN = 0.01


def _choose(trials: list, held_meter: LayerError, own: Any) -> tuple:
    """The trial with the lowest held-out error, the method's own damping unless beaten by the margin."""
    finite = [t for t in trials if math.isfinite(t[3]) and math.isfinite(t[4])]
    if not finite:
        return trials[0]
    best = max(finite, key=lambda t: t[4])
    mine = [t for t in finite if getattr(t[0], "damping", None) == getattr(own, "damping", None)]
    if mine and best is not mine[0]:
        error = lambda t: held_meter.before - t[4]  # noqa: E731 - held-out error (absolute)
        if error(best) > (1.0 - DAMPING_MARGIN) * error(mine[0]):
            return mine[0]
    return best


def _judge(entry, problem: LayerProblem, split: tuple[InputGroup, InputGroup], cfg: CorrectionConfig):
    """Fit on the fit share, judge on the held-out share.

    Every candidate setting is fitted on the fit share; the one with the lowest held-out error is
    judged: it passes when it lowers the error on the fit share *and* on the held-out share.
    Returns (settings, proposal, δ, reduction on the group's statistics, diagnostics); δ is zero when
    it fails. The accepted δ is the one fitted (``Holdout.refit`` no longer solves again: the
    held-out rows are in no statistic anything is fitted on).
    """
    fit_group, held_group = split
    h_held, _ = error_matrix(held_group)
    p, meter = problem, problem.meter
    if fit_group is p.group:  # the group's statistics are the fit share's
        fit_meter, fit_problem = meter, p
    else:
        h_fit, fit_source = error_matrix(fit_group)
        fit_meter = LayerError.of(p.w_orig, p.w_pruned, h_fit)
        fit_problem = LayerProblem(p.w_orig, p.w_pruned, p.mask, p.selected, p.scores, fit_group, fit_meter,
                                   fit_source)
    held_meter = LayerError.of(p.w_orig, p.w_pruned, h_held)

    def trial(settings: Any) -> tuple:
        proposal = entry.propose(fit_problem, settings)
        delta = proposal.delta.masked_fill(~p.selected, 0.0)
        return settings, proposal, delta, fit_meter.reduction(delta, proposal.quad), held_meter.reduction(delta)

    def passes(t: tuple) -> bool:
        return math.isfinite(t[3]) and t[3] > 0 and math.isfinite(t[4]) and t[4] > 0

    trials = [trial(s) for s in _candidates(cfg)]
    own = next((t for t in trials if t[0] == cfg.settings), trials[0])
    candidate = digest([(p.w_pruned + own[2]).masked_fill(p.mask, 0.0)])  # before the judge: its own setting's
    chosen = _choose(trials, held_meter, cfg.settings)
    escalated = False
    if not passes(chosen) and cfg.holdout.escalate and hasattr(chosen[0], "damping") and chosen[0].damping > 0:
        # Where the damping matters: the correction overfits at this damping, so try stronger ones
        # (shrinking δ toward no change) before refusing; the passing one with the lowest held-out error wins.
        more = [trial(dataclasses.replace(chosen[0], damping=chosen[0].damping * f)) for f in ESCALATION]
        trials += more
        good = [t for t in more if passes(t)]
        if good:
            chosen, escalated = max(good, key=lambda t: t[4]), True
    settings, proposal, delta, fit_gain, held_gain = chosen
    fitted = math.isfinite(fit_gain) and fit_gain > 0
    passed = passes(chosen)
    info: dict[str, Any] = {
        "holdout_share": cfg.holdout.share,
        "fit_tokens": fit_group.stats.count,
        "heldout_tokens": held_group.stats.count,
        "fit_error_before": fit_meter.relative(fit_meter.before),
        "fit_error_proposed": fit_meter.relative(fit_meter.before - fit_gain),
        "heldout_error_before": held_meter.relative(held_meter.before),
        "heldout_error_proposed": held_meter.relative(held_meter.before - held_gain),
        "passed": passed,
        "refused": fitted and not passed,
        "damping_escalated": escalated,
        "digest": candidate,
    }
    info["heldout_error_after"] = info["heldout_error_proposed"] if passed else info["heldout_error_before"]
    if len(trials) > 1:
        info["damping_heldout_errors"] = {repr(t[0].damping): held_meter.relative(held_meter.before - t[4])
                                          for t in trials}
    if not passed:
        info["error_proposed"] = meter.relative(meter.before - meter.reduction(delta))
        return settings, proposal, torch.zeros_like(delta), 0.0, info
    if fit_meter is meter:
        return settings, proposal, delta, fit_gain, info
    return settings, proposal, delta, meter.reduction(delta), info


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
    s: Any,
    own: PCGOutcome | None,
    before: float,
    after: float,
) -> dict[str, Any]:
    """The yardstick's optimum, and the fraction of its reduction the correction reached (``s``: the
    settings the correction ran with; its own optimum is reused when they match the yardstick's)."""
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
