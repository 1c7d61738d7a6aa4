"""The JSON report of a run: resolved configuration, environment, per-layer records, summary.

Writing it is :mod:`prac.io.outputs`' job (atomic, checked before any work)."""

from __future__ import annotations

import dataclasses
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import prac

if TYPE_CHECKING:
    from prac.core.records import LayerRecord


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prac": prac.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak accelerator memory (bytes) on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": int(rss * scale), "peak_memory_kind": "process_peak_rss"}


def jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tensors and devices made JSON-safe."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(obj, "n") and hasattr(obj, "m"):
            out["type"] = "nm"
        elif hasattr(obj, "sparsity") and len(out) == 1:
            out["type"] = "unstructured"
        return out
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None  # NaN: strict JSON has no such number; the summary's status says why
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return str(obj)  # a setting such as "no clamp"
    return obj


def summarize_layers(layers: list[LayerRecord], block_weights: tuple[int, int] | None = None) -> dict[str, Any]:
    """Sparsity over all pruned weights (weighted by size), row-sparsity range, mean relative layer
    error; with ``block_weights`` (zeros, entries) the share of zeros over *every* weight matrix of the
    blocks (routers, ignored layers and anything not pruned included); the MoE experts' token counts."""
    total = sum(rec.numel for rec in layers)
    pruned = sum(rec.sparsity * rec.numel for rec in layers)
    out: dict[str, Any] = {"sparsity": pruned / total if total else 0.0, "pruned_layers": len(layers),
                           "pruned_parameters": int(round(pruned)), "prunable_parameters": total}
    if block_weights is not None and block_weights[1]:
        out["block_weight_sparsity"] = block_weights[0] / block_weights[1]
        out["block_weight_parameters"] = block_weights[1]
    experts = [rec for rec in layers if rec.expert is not None]
    if experts:
        tokens = [rec.expert.get("tokens", 0) for rec in experts if "tokens" in rec.expert]
        out["experts"] = {
            "pruned_projections": len(experts),
            "tokens_min": min(tokens) if tokens else None,
            "tokens_max": max(tokens) if tokens else None,
            "no_tokens": sorted({rec.name.rsplit(".", 1)[0] for rec in experts if rec.expert.get("tokens") == 0}),
            "topped_up": [rec.name for rec in experts if rec.expert.get("prior_tokens", 0) > 0],
        }
    if layers:
        out["row_sparsity_min"] = min(rec.row_sparsity[0] for rec in layers)
        out["row_sparsity_max"] = max(rec.row_sparsity[1] for rec in layers)
    errors = [rec.relative_error for rec in layers if rec.relative_error is not None]
    if errors:
        out["mean_relative_error"] = sum(errors) / len(errors)
    return out
