"""Reconstruction correction after pruning: change surviving weights so the layer output stays close.

Every method minimises (exactly or approximately) ``‖X W_origᵀ - X (W_pruned + ΔW)ᵀ‖²`` with ΔW zero
wherever the mask pruned; see ``objective.py`` for the error, and ``full.py``, ``diagonal.py``,
``greedy.py``, ``optimal.py`` for the methods. :func:`correct` is the one entry point: it selects
the weights to change (``selection.py``), runs the method, reverts a layer whose error did not drop
("never worse"), and measures how much of the achievable reduction it reached (the ``optimal``
solve over all survivors, nearly undamped, is the yardstick).

Defaults, measured at 50% Wanda sparsity with the other settings at their defaults (percent-change
0.05, clamp 0.05): a correlated random 512 x 512 layer (4096 calibration tokens, 8192 held out), and
three real layers of the tiny-mistral fixture (q_proj, down_proj of layer 1, gate_proj of layer 3;
16k calibration tokens, 16k held out). "fraction" is the share of the optimum's error reduction.

- ``full`` selects ``top``: of the strategies that honour percent-change it is best everywhere
  (fraction 0.08 / 0.10 / 0.05 on the real layers vs 0.045 / 0.052 / 0.029 kneedle and
  0.027 / 0.027 / 0.020 moderate; 0.23 vs 0.14 / 0.06 on the random layer), also on held-out tokens.
  ``all`` reaches more (0.2-0.4) but ignores percent-change and needs one K = survivors system per
  row; for that use ``optimal``.
- damping ``1e-2`` (x mean diag H) for ``full``, ``diagonal`` and ``optimal``. Under the clamp the
  full solve is insensitive to it (fraction equal to 3 digits from 1e-4 to 1e-1). For ``optimal`` it
  costs 0.1% of the in-sample reduction on the real layers (fraction 0.999), cuts CG iterations
  (q_proj 76 vs 96 at 1e-6), and matters when calibration is short: with 384 tokens for 512 inputs,
  the held-out error *rises* 11% at 1e-3 and falls 13% at 1e-2 (outlier-scaled random layer; the
  plain mixed one still rises 27% at 1e-2 and needs 1e-1). For ``diagonal`` it keeps
  zero-mean inputs (whose mean is noise) from producing a harmful proposal: at 0 that proposal was
  reverted, at 1e-2 it is a harmless near-zero change.
- ``greedy`` patience 8: at the default 1% step patience 2 already gave the error of no early stopping
  on all five layers (1 lost a little); with 5x and 20x the step (down_proj) 4 did. 8 leaves a margin
  at no cost: the loop runs over rank positions for all rows anyway and ends early only once every
  row has stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from prac.correction.base import METHODS, STRATEGIES, CorrectionConfig, CorrectionResult
from prac.correction.diagonal import diagonal_delta
from prac.correction.full import FALLBACK, full_delta
from prac.correction.greedy import greedy_delta
from prac.correction.objective import (
    LayerError,
    clamp_delta,
    damping_lambda,
    error_hessian,
    james_stein_mean,
    sample_hessian,
    sparse_quadratic_rows,
)
from prac.correction.optimal import PCGOutcome, optimal_delta
from prac.correction.selection import select
from prac.errors import PracError
from prac.stats import InputStats, StatsSpec

__all__ = [
    "CorrectionConfig",
    "CorrectionResult",
    "METHODS",
    "STRATEGIES",
    "DEFAULT_DAMPING",
    "YARDSTICK_DAMPING",
    "YARDSTICK_TOL",
    "correct",
    "default_damping",
    "default_strategy",
    "format_diagnostics",
    "stats_spec",
    "summarize",
    "validate",
]

_DEFAULT_STRATEGY = {"full": "top", "diagonal": "moderate", "greedy": "weakest", "optimal": "all"}

#: Relative damping (λ = damping · mean diag H) when the config leaves it unset (see module docstring).
DEFAULT_DAMPING = {"full": 1e-2, "diagonal": 1e-2, "optimal": 1e-2}

#: Selected fraction of each row's survivors when unset. ``full`` selects more and clamps looser than
#: the notes' 5% / 5%: on the bundled model at 70% Wanda sparsity (golden calibration) 5% / 5% moved
#: perplexity only 74.41 -> 74.08, 20% / 20% reached 72.17 (top 5% unclamped: 74.57, worse).
DEFAULT_PERCENT_CHANGE = {"full": 0.2}
PERCENT_CHANGE_FALLBACK = 0.05

#: Clamp |δ| <= this x |w_orig| when unset; methods absent here never clamp.
DEFAULT_CLAMP = {"full": 0.2, "diagonal": 0.05}

#: The yardstick is the (nearly) undamped optimum: λ only keeps dead input features solvable.
YARDSTICK_DAMPING = 1e-6
#: ... solved tightly whatever the method's own tolerance (relative residual of each row's system).
YARDSTICK_TOL = 1e-4


def default_strategy(method: str) -> str:
    """The selection strategy a method uses when the config does not name one."""
    if method not in METHODS:
        raise PracError(f"unknown correction method {method!r}; expected one of {', '.join(METHODS)}")
    return _DEFAULT_STRATEGY.get(method, "all")


def default_damping(method: str) -> float:
    """The relative damping a method uses when the config does not set one (0 for methods without one)."""
    return DEFAULT_DAMPING.get(method, 0.0)


def resolve(cfg: CorrectionConfig) -> CorrectionConfig:
    """``cfg`` with every "method's own" setting (strategy, damping, percent-change, clamp) filled in."""
    validate(cfg)
    m = cfg.method
    return dataclasses.replace(
        cfg,
        selection_strategy=cfg.selection_strategy or default_strategy(m),
        damping=cfg.damping if cfg.damping is not None else default_damping(m),
        percent_change=cfg.percent_change if cfg.percent_change is not None
        else DEFAULT_PERCENT_CHANGE.get(m, PERCENT_CHANGE_FALLBACK),
        max_correction_magnitude=cfg.max_correction_magnitude if cfg.max_correction_magnitude is not None
        else DEFAULT_CLAMP.get(m, math.inf),
    )


def validate(cfg: CorrectionConfig) -> None:
    """Raise a one-line :class:`PracError` for any setting no method can run with."""

    def bad(what: str) -> None:
        raise PracError(f"invalid correction setting: {what}")

    if cfg.method not in METHODS:
        bad(f"method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.selection_strategy is not None and cfg.selection_strategy not in STRATEGIES:
        bad(f"selection strategy {cfg.selection_strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cfg.percent_change is not None and not (0.0 < cfg.percent_change <= 1.0):
        bad(f"percent-change must be in (0, 1], got {cfg.percent_change}")
    if cfg.damping is not None and not (math.isfinite(cfg.damping) and cfg.damping >= 0.0):
        bad(f"damping must be a finite number >= 0, got {cfg.damping}")
    if cfg.max_correction_magnitude is not None and not cfg.max_correction_magnitude > 0.0:
        bad(f"max-correction-magnitude must be > 0 (inf: no clamp), got {cfg.max_correction_magnitude}")
    if not (math.isfinite(cfg.correction_magnitude) and cfg.correction_magnitude > 0.0):
        bad(f"correction-magnitude must be > 0, got {cfg.correction_magnitude}")
    if cfg.max_activation_samples < 1:
        bad(f"max-activation-samples must be >= 1, got {cfg.max_activation_samples}")
    if cfg.patience < 1:
        bad(f"patience must be >= 1, got {cfg.patience}")
    if cfg.layer_batch_size < 0:
        bad(f"layer-batch-size must be >= 0, got {cfg.layer_batch_size}")
    if not (math.isfinite(cfg.optimal_tol) and cfg.optimal_tol > 0.0):
        bad(f"optimal tolerance must be > 0, got {cfg.optimal_tol}")
    if cfg.optimal_max_iter < 1:
        bad(f"optimal max iterations must be >= 1, got {cfg.optimal_max_iter}")
    if cfg.solve_memory_mb < 1:
        bad(f"solve memory must be >= 1 MB, got {cfg.solve_memory_mb}")


def stats_spec(cfg: CorrectionConfig) -> StatsSpec:
    """What :class:`InputStats` must collect for ``cfg``.

    The Hessian for ``full``/``optimal`` and, when ``cfg.measure``, for every method (exact errors
    and the yardstick). Token samples for ``greedy``, and for ``diagonal`` without ``measure``:
    the never-worse check needs some second-moment data, and the sample is the O(samples·in) one.
    """
    validate(cfg)
    if cfg.method == "none":
        return StatsSpec(seed=cfg.seed)
    hessian = cfg.method in ("full", "optimal") or cfg.measure
    needs_samples = cfg.method == "greedy" or (cfg.method == "diagonal" and not hessian)
    return StatsSpec(
        hessian=hessian, max_samples=cfg.max_activation_samples if needs_samples else 0, seed=cfg.seed
    )


def _require_hessian(error_source: str, method: str) -> None:
    """``full``/``optimal`` solve with H, so their errors are measured on it too (source "hessian")."""
    if error_source != "hessian":
        raise PracError(f"correction method {method!r} needs the input Hessian; collect stats with stats_spec(config)")


def _propose(
    method: str,
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    selected: torch.Tensor,
    scores: torch.Tensor,
    stats: InputStats,
    meter: LayerError,
    error_source: str,
    damping: float,
    cfg: CorrectionConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], PCGOutcome | None]:
    """The method's δ (before the never-worse check), its ``δᵢᵀ H δᵢ`` per row (H: the error
    matrix) and its method-specific diagnostics."""
    device = w_orig.device
    info: dict[str, Any] = {}
    outcome = None
    if method in ("full", "optimal"):
        _require_hessian(error_source, method)
        h, hd = meter.h, meter.dh
        lam = damping_lambda(torch.diagonal(h), damping)
        info["lambda"] = lam
        if method == "full":
            solve = full_delta(hd, w_orig, selected, h, lam, cfg.solve_memory_mb << 20, cfg.max_correction_magnitude)
            delta, quad = solve.delta, solve.quad
            info.update(solve_failures=solve.failures, solve_fallback=FALLBACK, clamped=solve.clamped)
        else:
            outcome = optimal_delta(
                w_orig, w_pruned, selected, h, lam, cfg.optimal_tol, cfg.optimal_max_iter, hd=hd
            )
            delta, quad = outcome.delta, outcome.quad
            info.update(
                solver_iterations=outcome.iterations,
                solver_residual=outcome.residual,
                solver_converged=outcome.converged,
                solver=outcome.solver,
                solver_fallback=outcome.fallback,
            )
    elif method == "diagonal":
        mu = james_stein_mean(stats).to(device)
        lam = damping_lambda(stats.sumsq.to(device) / max(stats.count, 1), damping)
        delta = diagonal_delta(w_orig, w_pruned, selected, mu, lam)
        delta, clamped = clamp_delta(delta, w_orig, selected, cfg.max_correction_magnitude)
        quad = sparse_quadratic_rows(delta, meter.h, selected)
        info.update({"lambda": lam, "clamped": clamped})
    elif method == "greedy":
        if stats.samples is None or stats.samples.shape[0] == 0:
            raise PracError(
                "correction method 'greedy' needs stored token samples; collect stats with stats_spec(config)"
            )
        # The meter's matrix (and its H d) is the sample's when errors are measured on the sample, or
        # when the sample holds every calibration token (then it is H itself, up to rounding).
        own = error_source == "samples" or int(stats.samples.shape[0]) == stats.count
        hs = meter.h if own else sample_hessian(stats.samples.to(device))
        run = greedy_delta(
            w_orig, w_pruned, selected, scores, hs, cfg.correction_magnitude, cfg.patience,
            hd=meter.dh if own else None,
        )
        delta = run.delta
        quad = run.quad if own else sparse_quadratic_rows(delta, meter.h, selected)
        info.update(
            candidates=run.candidates,
            positions_visited=run.visited,
            positions_corrected=run.corrected,
            corrected_pct=100.0 * run.corrected / max(run.candidates, 1),
            rows_stopped_early=run.rows_stopped_early,
            samples=int(stats.samples.shape[0]),
        )
    else:  # validate() rules this out; kept so a new METHODS entry cannot fall through silently
        raise PracError(f"correction method {method!r} is not implemented")
    return delta, quad, info, outcome


def _yardstick(mask: torch.Tensor, meter: LayerError, cfg: CorrectionConfig) -> PCGOutcome:
    lam = damping_lambda(torch.diagonal(meter.h), YARDSTICK_DAMPING)
    # optimal_delta only uses the difference w_orig - w_pruned, which is the meter's d.
    return optimal_delta(
        meter.d, torch.zeros_like(meter.d), ~mask, meter.h, lam, YARDSTICK_TOL, cfg.optimal_max_iter, hd=meter.dh
    )


def correct(
    w_orig: torch.Tensor,
    w_pruned: torch.Tensor,
    mask: torch.Tensor,
    stats: InputStats,
    scores: torch.Tensor,
    cfg: CorrectionConfig,
) -> CorrectionResult:
    """Correct one pruned linear; see the module docstring. Pure: inputs are not modified.

    ``method="none"`` returns ``w_pruned`` itself (no copy) with empty diagnostics.
    """
    if cfg.method == "none":
        validate(cfg)
        return CorrectionResult(weight=w_pruned, diagnostics={})
    cfg = resolve(cfg)
    if not (w_orig.shape == w_pruned.shape == mask.shape == scores.shape):
        raise ValueError(
            f"shapes differ: w_orig {tuple(w_orig.shape)}, w_pruned {tuple(w_pruned.shape)}, "
            f"mask {tuple(mask.shape)}, scores {tuple(scores.shape)}"
        )
    start = time.perf_counter()
    device = w_orig.device
    w_orig, w_pruned = w_orig.float(), w_pruned.float()
    mask, scores = mask.to(device), scores.to(device)
    strategy, damping = cfg.selection_strategy, cfg.damping

    h_err, source = error_hessian(stats, device)
    meter = LayerError.of(w_orig, w_pruned, h_err)
    selected = select(scores, mask, strategy, cfg.percent_change)
    delta, quad, info, own = _propose(
        cfg.method, w_orig, w_pruned, selected, scores, stats, meter, source, damping, cfg
    )
    delta = delta.masked_fill(~selected, 0.0)
    proposal = (w_pruned + delta).masked_fill(mask, 0.0)

    gain = meter.reduction(delta, quad)
    before = meter.relative(meter.before)
    proposed = meter.relative(meter.before - gain)
    accepted = math.isfinite(gain) and gain > 0
    after = proposed if accepted else before
    n_selected = int(selected.sum())
    magnitude = delta.abs()

    diagnostics: dict[str, Any] = {
        "method": cfg.method,
        "strategy": strategy,
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
    diagnostics.update(info)
    if cfg.method in DEFAULT_DAMPING:
        diagnostics["damping"] = float(damping)
    diagnostics["clamped_pct"] = 100.0 * diagnostics["clamped"] / max(n_selected, 1)
    if cfg.measure and source == "hessian":
        diagnostics.update(_measure_optimal(mask, meter, cfg, strategy, damping, own, before, after))
    # A layer with nothing to repair (no error before) is "unchanged", not a failed correction.
    diagnostics["status"] = "accepted" if accepted else ("unchanged" if meter.before <= 0 else "reverted")
    diagnostics["reverted"] = diagnostics["status"] == "reverted"
    diagnostics["seconds"] = time.perf_counter() - start
    return CorrectionResult(weight=proposal if accepted else w_pruned.clone(), diagnostics=diagnostics)


def _measure_optimal(
    mask: torch.Tensor,
    meter: LayerError,
    cfg: CorrectionConfig,
    strategy: str,
    damping: float,
    own: PCGOutcome | None,
    before: float,
    after: float,
) -> dict[str, Any]:
    """The yardstick: the optimum over all survivors, and the fraction of its reduction reached."""
    reuse = (
        own is not None and strategy == "all" and damping == YARDSTICK_DAMPING and cfg.optimal_tol <= YARDSTICK_TOL
    )
    best = own if reuse else _yardstick(mask, meter, cfg)
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


def summarize(diagnostics: list[dict]) -> dict:
    """Layer diagnostics rolled up for the run report (layers with empty diagnostics are skipped)."""
    rows = [d for d in diagnostics if d]

    def mean(key: str) -> float:
        vals = [float(d[key]) for d in rows if key in d]
        return sum(vals) / len(vals) if vals else 0.0

    summary = {
        "layers": len(rows),
        "mean_error_before": mean("error_before"),
        "mean_error_after": mean("error_after"),
        "mean_reduction": mean("reduction"),
        "mean_reduction_pct": mean("reduction_pct"),
        "total_solve_failures": sum(int(d.get("solve_failures", 0)) for d in rows),
        "mean_clamped_pct": mean("clamped_pct"),
        "reverted": sum(1 for d in rows if d.get("reverted")),
    }
    if any("fraction_of_optimal" in d for d in rows):  # only when the yardstick was measured
        summary["mean_fraction_of_optimal"] = mean("fraction_of_optimal")
    return summary


def format_diagnostics(name: str, d: dict) -> str:
    """A multi-line, human-readable block of one layer's diagnostics (for logging)."""
    if not d:
        return f"{name}: no correction"
    src = "full H" if d.get("error_source") == "hessian" else "samples"
    lines = [
        f"{name}: {d['method']} ({d['strategy']}), {d['status']}",
        f"  Error before ({src}): {d['error_before']:.6g}",
        f"  Error after ({src}): {d['error_after']:.6g}"
        + (f"  (rejected proposal: {d['error_proposed']:.6g})" if d.get("reverted") else ""),
        f"  Reduction: {d['reduction']:.6g} ({d['reduction_pct']:.2f}%)",
    ]
    if "fraction_of_optimal" in d:
        lines.append(
            f"  Fraction of optimal: {d['fraction_of_optimal']:.3f} (optimum {d['optimal_error']:.6g}, "
            f"CG {d['optimal_iterations']} it, residual {d['optimal_residual']:.2e})"
        )
    lines.append(f"  Correction magnitude: mean={d['delta_mean']:.6g}, max={d['delta_max']:.6g}")
    if d["method"] in ("full", "diagonal"):  # the methods with a clamp
        lines.append(f"  Clamped: {d['clamped']}/{d['selected']} ({d['clamped_pct']:.1f}%)")
    if "solve_fallback" in d:
        lines.append(f"  Solve failures: {d['solve_failures']} (fallback: {d['solve_fallback']})")
    if "solver_iterations" in d:
        lines.append(
            f"  Solver: CG {d['solver_iterations']} it, residual {d['solver_residual']:.2e}, "
            f"converged={d['solver_converged']}"
        )
    if "candidates" in d:
        lines.append(
            f"  Positions corrected: {d['positions_corrected']}/{d['candidates']} candidates "
            f"({d['corrected_pct']:.1f}%), visited {d['positions_visited']}, "
            f"{d['rows_stopped_early']} rows stopped early"
        )
    return "\n".join(lines)
