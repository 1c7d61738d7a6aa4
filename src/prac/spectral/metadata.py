"""What a spectral result records about how it was computed: the notes on what the numbers mean, the
run's settings (blocks, subsampling, solver, streaming) and the library versions.
"""

from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch

from prac.spectral.config import SpectralConfig

EVAL_NOTE = ("the model runs in eval() mode (restored afterwards): dropout is off and BatchNorm uses its running "
             "statistics, so gᵢ is the gradient of the deterministic eval-mode network; if your Fisher is defined "
             "with train-mode statistics, compute it with precomputed_gradients")
CENTERED_NOTE = ("centred: the spectrum is that of the gradient covariance C = (1/N) Σ (gᵢ−ḡ)(gᵢ−ḡ)ᵀ = F − ḡḡᵀ; its "
                 "Gram (I−11ᵀ/N)K(I−11ᵀ/N) annihilates the all-ones vector, so it has at least one exact zero "
                 "eigenvalue (rank ≤ N−1); condition numbers use only eigenvalues above tol")
SUBSAMPLE_NOTE = ("a subsampled block reports the eigenvalues of the principal submatrix F[S,S] on its sampled "
                  "coordinates S, not of F: by Cauchy interlacing λ_k(F[S,S]) ≤ λ_k(F), and E[tr F[S,S]] = "
                  "(|S|/P)·tr F under uniform sampling")


def run_metadata(cfg: SpectralConfig, part, plans, passes, width, center, solve_device, spectra) -> dict:
    """The settings of a run: blocks, subsampling, solver, streaming, config and versions."""
    solver = "eigvalsh" if cfg.top_k_eigenvalues is None else "svd_lowrank"
    jitters = {k: s.solve.get("jitter", 0.0) for k, s in spectra.items() if s.solve.get("jitter")}
    return {
        "centered": center,
        "normalization": "1/N",
        "fisher": "F = (1/N) Σᵢ gᵢgᵢᵀ" if not center else "C = (1/N) Σᵢ (gᵢ−ḡ)(gᵢ−ḡ)ᵀ",
        "block_structure": part.structure if part else None,
        "blocks": [b.key for b in part.blocks] if part else [],
        "excluded_parameters": list(part.excluded) if part else [],
        "subsampling": {
            "max_params_per_block": cfg.max_params_per_block,
            "method": "uniform without replacement (numpy PCG64), seed = (seed + sha1(block key) mod 1e9+7) mod 2^31-1",
            "blocks": {p.block.key: {"fraction": p.width / p.block.n_params if p.block.n_params else 1.0,
                                     "seed": p.seed, "n_params_used": p.width}
                       for p in plans if p.used is not None},
        },
        "solver": {"name": solver, "exact": solver == "eigvalsh", "top_k": cfg.top_k_eigenvalues,
                   "eigensolve_device": cfg.eigensolve_device,
                   "device_used": sorted({s.solve.get("device", "") for s in spectra.values()}),
                   "rank_tolerance": (f"tol = λmax · {cfg.rank_rtol}" if cfg.rank_rtol is not None
                                      else "tol = λmax · N · eps(float64)")
                   + "; condition_number = λmax / (smallest eigenvalue > tol), numerical_rank = #(λ > tol)",
                   "gram": "N×N Gram GGᵀ/N in float64; reports the min(N, P_used) largest eigenvalues",
                   "jitter_applied": bool(jitters), "jitter": jitters,
                   "cpu_retries": [k for k, s in spectra.items() if s.solve.get("cpu_retry")]},
        "streaming": {"enabled": cfg.streaming, "passes": len(passes),
                      "slice_width": width if cfg.streaming else None, "budget_mb": cfg.stream_budget_mb}
        if cfg.streaming else {"enabled": False, "passes": len(passes)},
        "gram_dtype": "float64",
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "versions": versions(),
    }


def versions() -> dict:
    """The versions of prac, torch, numpy, Python and (if installed) transformers."""
    import prac

    out = {"prac": prac.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        out["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        out["transformers"] = None
    return out
