"""Per-layer micro-benchmark: SparseGPT's update vs the correction methods on the Wanda mask.

For every input width and pattern, one synthetic linear layer (out x in) is pruned

- by SparseGPT (its own mask and update), and
- by Wanda, then corrected with each of ``prac.correction``'s methods,

and the table reports each method's time, its ratio to SparseGPT's time in the same run, the
relative output error ‖X(W−W₀)ᵀ‖² / ‖XW₀ᵀ‖², and the fraction of the exact optimum's error
reduction it reached on the Wanda mask. SparseGPT's fraction is measured against the *Wanda
mask's* optimum, which its own mask may beat (fraction > 1): read its relative error instead.

Activations are synthetic but correlated and seeded: X = (Z Bᵀ + ε E) · s with a low-rank mixing
B (a few dominant directions, as in LLM hidden states), isotropic noise E and log-normal
per-feature scales s (outlier channels). Weights are N(0, 1/in).

Timing syncs CUDA around each call, after one untimed warm-up layer (skipped with ``--smoke``);
each call runs once, so treat small differences as noise. Correction methods are timed with ``exact_errors=False`` (the
method and its never-worse check, as a pipeline without the yardstick runs it); the optimum
itself is computed once per layer in a separate, untimed call with exact errors on.

Usage::

    PYTHONPATH=src python bench/layer_speed.py --device auto --out bench/layer_speed.json
    PYTHONPATH=src python bench/layer_speed.py --smoke --out /tmp/smoke.json   # seconds, CPU
    PYTHONPATH=src python bench/layer_speed.py --in-features 4096 --patterns 2:4 --methods optimal
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prac.methods.masks import apply_mask, mask_from_scores, wanda_scores
from prac.methods.patterns import Pattern, Unstructured, parse_nm, pattern_to_dict
from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from prac.model.stats import InputStats, StatsSpec

try:
    import prac.correction as correction
except ImportError as exc:  # another engineer's module; the harness still times SparseGPT
    correction = None
    CORRECTION_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    CORRECTION_IMPORT_ERROR = ""

DEFAULT_METHODS = ("full", "diagonal", "greedy", "optimal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--in-features", type=int, nargs="+", default=[1024, 2048, 4096, 14336])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument(
        "--tokens", type=int, default=None,
        help="calibration tokens per layer (default: max(8192, 2 x in): fewer tokens than inputs leave H singular)",
    )
    p.add_argument("--rank", type=int, default=128, help="rank of the shared mixing of the activations")
    p.add_argument("--patterns", default="0.5,2:4", help="comma list: unstructured fractions and/or N:M")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help="comma list of correction methods; optimal@TOL runs optimal with that tolerance (e.g. optimal@1e-2)",
    )
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per add_batch call")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (64 x 128, 512 tokens): seconds on a CPU")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.smoke:
        args.in_features, args.out_features, args.tokens, args.rank = [128], 64, 512, 16
        args.batch_tokens = 256
    return args


def parse_patterns(text: str) -> list[Pattern]:
    return [parse_nm(t) if ":" in t else Unstructured(float(t)) for t in text.split(",") if t.strip()]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    return torch.device(name)


def synthetic_layer(
    in_features: int, out_features: int, tokens: int, rank: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated activations X [tokens, in] and a dense weight W [out, in], both seeded."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    rank = min(rank, in_features)
    mixing = randn(in_features, rank) / math.sqrt(rank)
    x = randn(tokens, rank) @ mixing.T + 0.3 * randn(tokens, in_features)
    x *= torch.exp(0.7 * randn(in_features))
    weight = randn(out_features, in_features) / math.sqrt(in_features)
    return x, weight


def collect_stats(x: torch.Tensor, spec: StatsSpec, batch_tokens: int) -> InputStats:
    stats = InputStats(x.shape[1], device=x.device, spec=spec)
    for chunk in x.split(batch_tokens):
        stats.add_batch(chunk)
    return stats


def relative_error(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    """‖X(W−W₀)ᵀ‖² / ‖XW₀ᵀ‖² from H = XᵀX (any scale)."""
    d = w - w0
    return float(((d @ h) * d).sum() / ((w0 @ h) * w0).sum())


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def jsonable(value: Any) -> Any:
    """Diagnostics as JSON: tensors become numbers or short lists, unknown objects strings."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def bench_layer(
    in_features: int, pattern: Pattern, methods: list[str], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """All rows (SparseGPT first, then each correction method) for one layer and pattern."""
    tokens = args.tokens or max(8192, 2 * in_features)
    x, w = synthetic_layer(in_features, args.out_features, tokens, args.rank, args.seed, device)
    spec = StatsSpec(hessian=True, seed=args.seed)
    if correction is not None:
        for m in methods:
            if not m.startswith("admm"):  # a mask source, not a correction: it reads H
                spec = spec.union(correction.stats_spec(method_config(m)))
    stats = collect_stats(x, spec, args.batch_tokens)
    del x
    h = stats.hessian
    base = {"in_features": in_features, "out_features": args.out_features, "pattern": str(pattern), "tokens": tokens}

    sgpt_config = SparseGPTConfig(blocksize=args.blocksize)
    sgpt, sgpt_seconds = timed(lambda: sparsegpt_prune(w, h, pattern, sgpt_config), device)
    sgpt_error = relative_error(sgpt.weight, w, h)

    scores = wanda_scores(w, stats.l2)
    mask = mask_from_scores(scores, pattern)
    w_pruned = apply_mask(w, mask)
    wanda_error = relative_error(w_pruned, w, h)
    optimum = optimal_error(w, w_pruned, mask, stats, scores) if correction is not None else None

    def fraction(err: float) -> float | None:
        reachable = None if optimum is None else wanda_error - optimum
        return (wanda_error - err) / reachable if reachable else None

    rows = [
        {
            **base,
            "method": "sparsegpt",
            "seconds": sgpt_seconds,
            "ratio_to_sparsegpt": 1.0,
            "relative_error": sgpt_error,
            "wanda_relative_error": wanda_error,
            "optimal_relative_error": optimum,
            "fraction_of_optimal": fraction(sgpt_error),
            "fraction_comparable": False,
            "diagnostics": jsonable(sgpt.diagnostics),
        }
    ]
    sgpt_mask = sgpt.mask
    del sgpt
    optimum_sgpt: list[float | None] = []  # the SparseGPT mask's optimum, computed once for every admm row
    for method in [m for m in methods if m.startswith("admm")]:
        rows.append(admm_row(method, w, stats, pattern, sgpt_mask, sgpt_seconds, sgpt_error, base, device, optimum_sgpt))
    if correction is None:
        return rows
    for method in [m for m in methods if not m.startswith("admm")]:
        cfg = method_config(method)
        row: dict[str, Any] = {**base, "method": method, "wanda_relative_error": wanda_error}
        try:
            result, seconds = timed(lambda: correction.correct(w, w_pruned, mask, stats, scores, cfg), device)
        except Exception as exc:  # noqa: BLE001 - a bench reports a failing method and goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        err = relative_error(result.weight, w, h)
        row.update(
            seconds=seconds,
            ratio_to_sparsegpt=seconds / sgpt_seconds,
            relative_error=err,
            optimal_relative_error=optimum,
            fraction_of_optimal=fraction(err),
            fraction_comparable=True,
            diagnostics=jsonable(result.diagnostics),
        )
        rows.append(row)
    return rows


def admm_settings(name: str) -> Any:
    """``admm`` -> the defaults; ``admm@blocks`` -> ``sweep="blocks"``; ``admm@blocks+none`` -> that
    with ``final="none"``; ``admm@blocks/64`` -> blocksize 64 (``+`` and ``/`` combine)."""
    from prac.methods.admm import ADMMSettings

    _, _, spec = name.partition("@")
    kw: dict[str, Any] = {}
    if spec:
        spec, _, final = spec.partition("+")
        sweep, _, blocksize = spec.partition("/")
        kw["sweep"] = sweep
        if blocksize:
            kw["blocksize"] = int(blocksize)
        if final:
            kw["final"] = final
    return ADMMSettings(**kw)


def admm_row(name, w, stats, pattern, sgpt_mask, sgpt_seconds, sgpt_error, base, device, optimum_sgpt) -> dict[str, Any]:
    """``--method admm`` (``name``: see :func:`admm_settings`) on the same layer: time and error next to
    SparseGPT's, and the exact optimum (the yardstick) on each of the two masks — how much of the
    gain is the mask, how much the weights."""
    from prac.methods.admm import admm_prune
    from prac.model.group import InputGroup

    h = stats.hessian
    settings = admm_settings(name)
    result, seconds = timed(lambda: admm_prune(w, InputGroup(["layer"], stats, device), pattern, settings), device)
    err = relative_error(result.weight, w, h)
    scores = wanda_scores(w, stats.l2)
    optimum_admm = optimal_error(w, apply_mask(w, result.mask), result.mask, stats, scores)
    if not optimum_sgpt:
        optimum_sgpt.append(optimal_error(w, apply_mask(w, sgpt_mask), sgpt_mask, stats, scores))
    optimum_sgpt = optimum_sgpt[0]
    return {**base, "method": name, "seconds": seconds, "ratio_to_sparsegpt": seconds / sgpt_seconds,
            "relative_error": err, "error_vs_sparsegpt": err / sgpt_error if sgpt_error else None,
            "optimal_relative_error": optimum_admm, "optimum_on_sparsegpt_mask": optimum_sgpt,
            "fraction_of_optimal": None, "fraction_comparable": False, "diagnostics": jsonable(result.info)}


def method_config(name: str) -> correction.CorrectionConfig:
    """``full`` -> that method's defaults; ``optimal@1e-2`` -> optimal with ``tol=1e-2``."""
    method, _, tol = name.partition("@")
    extra = {"tol": float(tol)} if tol else {}
    return correction.CorrectionConfig.of(method, exact_errors=False, **extra)


def optimal_error(
    w: torch.Tensor, w_pruned: torch.Tensor, mask: torch.Tensor, stats: InputStats, scores: torch.Tensor
) -> float | None:
    """The Wanda mask's optimum (the correction module's yardstick) from one untimed call of the
    cheapest method with exact errors on; None if the module does not report it."""
    cfg = correction.CorrectionConfig.of("diagonal", exact_errors=True)
    try:
        diagnostics = correction.correct(w, w_pruned, mask, stats, scores, cfg).diagnostics
    except Exception:  # noqa: BLE001 - the timed call of the same method reports the error
        return None
    value = diagnostics.get("optimal_error")
    return None if value is None else float(value)


def fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| in | out | pattern | method | seconds | × SparseGPT | rel. error | fraction of optimum |",
        "|---:|---:|:---|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['in_features']} | {r['out_features']} | {r['pattern']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        frac = fmt(r.get("fraction_of_optimal"), ".3f")
        if not r.get("fraction_comparable", True) and frac != "–":
            frac += " (own mask)"
        if r["method"].startswith("admm"):
            frac = (f"own-mask optimum {fmt(r.get('optimal_relative_error'), '.4g')}, "
                    f"SparseGPT-mask optimum {fmt(r.get('optimum_on_sparsegpt_mask'), '.4g')}")
        lines.append(
            f"{head} {r['seconds']:.3f} | {r['ratio_to_sparsegpt']:.2f} | {r['relative_error']:.4g} | {frac} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    patterns = parse_patterns(args.patterns)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if correction is None:
        print(f"prac.correction is not importable ({CORRECTION_IMPORT_ERROR}); timing SparseGPT only",
              file=sys.stderr)
    if not args.smoke:  # pay one-off start-up (thread pools, cuBLAS/cuSOLVER) before timing
        tiny = argparse.Namespace(**{**vars(args), "out_features": 16, "tokens": 256, "rank": 8})
        bench_layer(64, patterns[0], methods, tiny, device)

    rows: list[dict[str, Any]] = []
    for in_features in args.in_features:
        for pattern in patterns:
            rows.extend(bench_layer(in_features, pattern, methods, args, device))
            print(f"done: in={in_features} pattern={pattern}", file=sys.stderr, flush=True)
    print(markdown(rows))

    if args.out is not None:
        report = {
            "device": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
            ),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "correction_available": correction is not None,
            "correction_import_error": CORRECTION_IMPORT_ERROR or None,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "patterns": [pattern_to_dict(p) for p in patterns],
            "sparsegpt_config": dataclasses.asdict(SparseGPTConfig(blocksize=args.blocksize)),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
