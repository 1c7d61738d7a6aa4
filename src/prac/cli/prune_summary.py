"""What ``prac prune`` prints when it is done: the summary lines of its report."""

from __future__ import annotations

import sys
from typing import Any

from prac.cli.common import not_finite, number
from prac.cli.structure import structure_lines


def format_summary(report: dict[str, Any], save: str | None = None, report_path: str | None = None) -> str:
    """The lines printed after a prune; any missing, None or non-finite number shows as ``nan``."""
    s = report["summary"]
    memory = s.get("peak_memory_bytes")
    peak = f"(peak memory {number(None if memory is None else memory / 2**20, '.0f')} MiB)"
    if s.get("structure") and not s.get("pruned_layers"):  # the structured pass was the whole run
        lines = [f"structured only, no sparsity pass {peak}"]
    else:
        lines = [f"pruned {s.get('pruned_layers')} layers in {report.get('config', {}).get('blocks')}: "
                 f"sparsity {number(s.get('sparsity'))} in {number(s.get('prune_seconds'), '.1f')}s {peak}"]
    lines += structure_lines(s)
    if "block_weight_sparsity" in s:
        lines.append(f"all weight matrices of the blocks: {number(s['block_weight_sparsity'])} zero "
                     f"(routers, ignored layers and weights that were already zero included)")
    if "experts" in s:
        e = s["experts"]
        lines.append(f"experts: {e['pruned_projections']} projections, {e['tokens_min']}..{e['tokens_max']} "
                     f"calibration tokens each; {len(e['topped_up'])} topped up with the block's tokens, "
                     f"{len(e['no_tokens'])} experts got none")
    sets = s.get("eval_sets") or ({"": {k: s[k] for k in ("dense_ppl", "ppl", "dense_cached") if k in s}}
                                  if "ppl" in s or "dense_ppl" in s else {})
    if "dense_ppl_cached" in s and "" in sets:
        sets[""]["dense_cached"] = s["dense_ppl_cached"]
    for name, r in sets.items():
        on = f" on {name}" if name else ""
        cached = " (cached)" if r.get("dense_cached") else ""
        if "dense_ppl" in r:
            lines.append(f"perplexity{on}: dense {number(r['dense_ppl'])}{cached} -> pruned {number(r.get('ppl'))}")
        elif "ppl" in r:
            lines.append(f"perplexity{on}: pruned {number(r['ppl'])}")
    if "zeroshot" in s:
        from prac.parallel.harness import format_table

        lines.append(format_table(s["zeroshot"]))
    if "cosine_similarity" in s:
        lines.append(f"cosine similarity of last hidden states to dense: {number(s['cosine_similarity'], '.6f')}")
    if "mean_relative_error" in s:
        lines.append(f"mean relative layer error: {number(s['mean_relative_error'], '.6f')}")
    if "reconstruction" in s:
        r = s["reconstruction"]
        held = (f", held-out {number(r['mean_heldout_error_before'], '.5f')} -> "
                f"{number(r['mean_heldout_error_after'], '.5f')}"
                if "mean_heldout_error_before" in r else "")
        tokens = s.get("calibration_tokens")
        judged = (f"; fitted on {tokens['fitted']} tokens, judged on {tokens['held_out']} held out" if tokens else "")
        lines.append(f"{r['mode']} reconstruction: kept in {r['kept']}/{r['blocks']} blocks; block output error "
                     f"{number(r['mean_fit_error_before'], '.5f')} -> {number(r['mean_fit_error_after'], '.5f')}{held} "
                     f"({r['steps']} steps, {number(r['seconds'], '.1f')}s{judged})")
    if "quantization" in s:
        q = s["quantization"]
        before = q.get("mean_relative_error_unquantized")
        errors = (f"; mean layer error {number(before, '.6f')} before rounding -> "
                  f"{number(q.get('mean_relative_error'), '.6f')}"
                  if before is not None else f"; mean layer error {number(q.get('mean_relative_error'), '.6f')}")
        groups = "per channel" if q["group_size"] == -1 else f"groups of {q['group_size']}"
        sweeps = ", ".join(f"{k}: {v}" for k, v in q["sweeps"].items())
        lines.append(f"quantized {q['quantized_layers']} layers to {q['bits']}-bit, {groups}, "
                     f"{'symmetric' if q['symmetric'] else 'asymmetric'} ({sweeps}){errors}")
    if "correction" in s:
        lines.append(format_correction(s["correction"], report_path))
    if save:
        saved = report.get("saved") or {}
        size = (f" ({saved['format']}, {saved['weight_bytes'] / 2**20:.2f} MiB of weights)"
                if "weight_bytes" in saved else "")
        lines.append(f"saved to {save}{size}")
    if report_path:
        lines.append(f"report written to {report_path}")
    return "\n".join(lines)


def format_correction(c: dict[str, Any], report_path: str | None = None) -> str:
    """The correction's one summary line: layers, mean error before -> after, the held-out check and
    the yardstick when measured, and only the failures that happened (solve failures, reverted or
    refused layers, solver fallbacks); every number is in the report's ``summary.correction``."""
    layers = f"{c['layers']} layers, " if "layers" in c else ""
    line = (f"correction: {layers}mean error {number(c.get('mean_error_before'), '.6g')} -> "
            f"{number(c.get('mean_error_after'), '.6g')} ({number(c.get('mean_reduction_pct'), '.1f')}% lower)")
    if "mean_heldout_error_before" in c:
        line += (f", held-out {number(c['mean_heldout_error_before'], '.6g')} -> "
                 f"{number(c.get('mean_heldout_error_after'), '.6g')}")
    if "mean_fraction_of_optimal" in c:
        line += f", {number(c['mean_fraction_of_optimal'], '.3f')} of optimal"
    events = [f"{c[k]} {what}" for k, what in (("total_solve_failures", "solve failures"), ("reverted", "reverted"),
                                               ("refused", "refused on held-out"),
                                               ("layers_with_solver_fallback", "layers on the solver's fallback"))
              if c.get(k)]
    if c.get("solver_converged") is False:
        events.append("solver short of tolerance")
    if events:
        line += "; " + ", ".join(events)
    return line + ("" if report_path else " (every number: --report FILE)")


def print_summary(report: dict[str, Any], save: str | None = None, report_path: str | None = None) -> int:
    """Print the summary; exit code 1 when the report's status says the result is not finite."""
    print(format_summary(report, save, report_path))
    status = not_finite(report["summary"])
    if status is not None:
        print(f"prac prune: the result is not usable (status {status})", file=sys.stderr)
        return 1
    return 0
