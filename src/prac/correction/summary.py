"""Correction diagnostics for people: rolled up for the run report, and one layer's block for the log."""

from __future__ import annotations


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
        "solver_stalled_rows": sum(int(d.get("solver_stalled_rows", 0)) for d in rows),
        "layers_with_solver_fallback": sum(1 for d in rows if d.get("solver_fallback")),
        "solver_converged": all(d.get("solver_converged", True) for d in rows),
    }
    judged = [d for d in rows if "heldout_error_before" in d]
    if judged:  # held-out acceptance ran: how the corrections fared on tokens they did not fit
        summary["refused"] = sum(1 for d in rows if d.get("refused"))
        summary["damping_escalated"] = sum(1 for d in rows if d.get("damping_escalated"))
        summary["heldout_layers"] = len(judged)
        summary["mean_fit_error_before"] = sum(d["fit_error_before"] for d in judged) / len(judged)
        summary["mean_fit_error_proposed"] = sum(d["fit_error_proposed"] for d in judged) / len(judged)
        summary["mean_heldout_error_before"] = sum(d["heldout_error_before"] for d in judged) / len(judged)
        summary["mean_heldout_error_after"] = sum(d["heldout_error_after"] for d in judged) / len(judged)
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
    if "heldout_error_before" in d:
        lines.append(
            f"  Held-out ({d['heldout_tokens']} tokens, fitted on {d['fit_tokens']}): "
            f"{d['heldout_error_before']:.6g} -> {d['heldout_error_proposed']:.6g}"
            f" (fitted tokens {d['fit_error_before']:.6g} -> {d['fit_error_proposed']:.6g})"
            + (", refused" if d.get("refused") else "")
        )
    if "fraction_of_optimal" in d:
        lines.append(
            f"  Fraction of optimal: {d['fraction_of_optimal']:.3f} (optimum {d['optimal_error']:.6g}, "
            f"CG {d['optimal_iterations']} it, residual {d['optimal_residual']:.2e})"
        )
    lines.append(f"  Correction magnitude: mean={d['delta_mean']:.6g}, max={d['delta_max']:.6g}")
    if "clamp_bound" in d:  # the methods with a clamp
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


def run_warning(diagnostics: list[dict]) -> str | None:
    """One line for the whole run when some layer's solver needed a fallback (None when none did)."""
    rows = [d for d in diagnostics if d and d.get("solver_fallback")]
    if not rows:
        return None
    stalled = sum(int(d.get("solver_stalled_rows", 0)) for d in rows)
    unconverged = sum(1 for d in rows if not d.get("solver_converged", True))
    return (f"optimal correction: {len(rows)} layer(s) needed the Jacobi-PCG fallback ({stalled} row(s) stalled in the "
            f"Schur solve); {unconverged} layer(s) still short of the tolerance; details per layer in the report")
