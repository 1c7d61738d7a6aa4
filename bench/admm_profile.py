"""Where ``--method admm``'s time goes on one layer: eigendecomposition, the ADMM iterations (their
matmuls and projections apart), the exact final solve; next to SparseGPT on the same H.

    python bench/admm_profile.py --device cuda --in-features 4096,14336 --out admm_profile.json

Synthetic correlated activations (``bench/layer_speed.py``), 50% unstructured, CUDA synchronised
around each phase; each phase is timed on the second call. ``--torch-profile`` also prints torch's
own table of the ADMM iterations' kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    from layer_speed import synthetic_layer
    from prac.correction.objective import LayerError
    from prac.correction.optimal import optimal_delta
    from prac.methods.admm import ADMMSettings, admm_mask, project, spectrum
    from prac.methods.patterns import Unstructured
    from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
    from prac.model.group import InputGroup
    from prac.model.stats import InputStats, StatsSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--in-features", default="4096,14336")
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    settings, pattern = ADMMSettings(), Unstructured(0.5)

    def timed(fn):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    rows = []
    for width in (int(w) for w in args.in_features.split(",")):
        x, w0 = synthetic_layer(width, args.out_features, args.tokens, 64, 0, device)
        stats = InputStats(width, device, StatsSpec(hessian=True))
        stats.add_batch(x)
        del x
        group = InputGroup(["layer"], stats, device)
        h = group.hessian()
        spec, t_eigh = timed(lambda: spectrum(h))
        (mask, _z, _info), t_iter = timed(lambda: admm_mask(w0, spec, pattern, settings))
        wt = w0 * spec.scale.unsqueeze(0)
        _, t_project = timed(lambda: project(wt.abs(), pattern, 0.5, settings.scope))
        _, t_matmul = timed(lambda: (wt @ spec.vectors) @ spec.vectors.T)
        inverse = group.inverse(settings.final_damping)
        pruned = w0.masked_fill(mask, 0.0)
        meter = LayerError.of(w0, pruned, h)
        outcome, t_final = timed(lambda: optimal_delta(w0, pruned, ~mask, h, inverse.lam, settings.final_tol,
                                                       settings.final_max_iter, hd=meter.dh, inverse=inverse, warn=False))
        _, t_sgpt = timed(lambda: sparsegpt_prune(w0, h, pattern, SparseGPTConfig()))
        row = {"in": width, "out": args.out_features, "eigh_s": t_eigh, "admm_iterations_s": t_iter,
               "per_iteration_projection_s": t_project, "per_iteration_matmuls_s": t_matmul,
               "iterations": settings.iterations, "final_solve_s": t_final, "final_solver": outcome.solver,
               "final_iterations": outcome.iterations, "sparsegpt_s": t_sgpt,
               "admm_total_s": t_eigh + t_iter + t_final}
        row["admm_over_sparsegpt"] = row["admm_total_s"] / t_sgpt
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                admm_mask(w0, spec, pattern, settings)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
