"""The summary's status and the report as written, shared by ``prac prune`` and ``prac eval``.

The summary's ``status`` is ``"ok"`` when every metric (``ppl``, ``dense_ppl``,
``cosine_similarity``) is finite, else ``"not_finite"`` (the metrics are written as JSON ``null``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from prac.io.report import environment
from prac.parallel import session as distributed

METRICS = ("dense_ppl", "ppl", "cosine_similarity")


def set_status(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary["status"]``: ``"ok"`` when every metric present is finite, else ``"not_finite"``
    (with ``summary["not_finite"]`` naming them)."""
    bad = [k for k in METRICS if isinstance(summary.get(k), float) and not math.isfinite(summary[k])]
    for name, result in list((summary.get("eval_sets") or {}).items())[1:]:  # the first is the summary's own
        bad += [f"{k}[{name}]" for k in METRICS if isinstance(result.get(k), float) and not math.isfinite(result[k])]
    summary["status"] = "not_finite" if bad else "ok"
    if bad:
        summary["not_finite"] = bad
    return summary


def json_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report as written: non-finite metrics become ``None`` (JSON ``null``; the status says why)."""
    out = copy.copy(report)
    out["summary"] = {k: (None if k in (*METRICS, "mean_nll") and isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in report["summary"].items()}
    return out


def run_environment(device: torch.device, session: distributed.Session | None = None) -> dict[str, Any]:
    """:func:`prac.io.report.environment` plus the thread counts bit-identity depends on, and the launch
    (``world_size``, ``backend``: 1 and None without torchrun)."""
    env = environment(device)
    env.setdefault("cpu_threads", torch.get_num_threads())
    env["interop_threads"] = torch.get_num_interop_threads()
    env.update(distributed.describe(session))
    return env
