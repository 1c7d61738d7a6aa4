"""The invariants every run relies on, checked on a given model and calibration set (``prac verify``).

1. Wanda's L2 salience from the running sum of squares equals the one from diag(H) (≤ 1e-5 relative).
2. Statistics accumulated batch by batch equal those accumulated in one shot (≤ 1e-5 relative).
3. With correction ``none`` every method's collection mode (Hessian, stored samples) yields the
   identical model, bit for bit.
4. Every corrected layer ends with a lower error than uncorrected (or is reverted to it).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from prac import correction
from prac.correction import CorrectionConfig, corrections
from prac.engine import calibrate
from prac.group import InputGroup
from prac.pipeline import PruneConfig, prune_model
from prac.stats import InputStats, StatsSpec

TOLERANCE = 1e-5


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_l2_salience(model, calib, cfg: PruneConfig, device) -> Check:
    worst = [0.0, ""]

    def observe(group: InputGroup) -> None:
        st = group.stats
        rel = float((st.l2.double() - st.hessian.diagonal().clamp_min(0).sqrt().double()).abs().max()
                    / st.l2.double().max().clamp_min(1e-30))
        if rel >= worst[0]:
            worst[:] = [rel, group.names[0]]

    prune_model(copy.deepcopy(model), calib, replace(cfg, collect=StatsSpec(hessian=True)), device, observer=observe)
    return Check("L2 salience: sum of squares vs diag(H)", worst[0] <= TOLERANCE,
                 f"max relative difference {worst[0]:.2e} ({worst[1]})")


class _RecordingStats(InputStats):
    """Statistics that also keep every row they were given, to redo them in one shot."""

    def __init__(self, dim: int, device: torch.device, spec: StatsSpec):
        super().__init__(dim, device, spec)
        self.rows: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        super().add_batch(x)
        self.rows.append(x.detach().reshape(-1, self.dim).float())


def check_incremental(model, calib, cfg: PruneConfig, device) -> Check:
    """Block 0's linear inputs, accumulated per batch vs in one ``add_batch`` of all tokens."""
    spec = StatsSpec(hessian=True)
    groups: list[_RecordingStats] = []
    calibrate(model, calib, spec, lambda g: groups.append(g.stats), cfg.engine, device, cfg.ignore,
              max_blocks=1, stats_factory=_RecordingStats)
    worst = 0.0
    for st in groups:
        one = InputStats(st.dim, device, spec)
        one.add_batch(torch.cat(st.rows))
        worst = max(worst, _rel(st.sum, one.sum), _rel(st.sumsq, one.sumsq), _rel(st.hessian, one.hessian))
        if st.count != one.count:
            worst = float("inf")
    return Check("incremental vs one-shot statistics", worst <= TOLERANCE,
                 f"max relative difference {worst:.2e} over {len(groups)} inputs of block 0")


def check_none_identical(model, calib, cfg: PruneConfig, device) -> Check:
    base_cfg = replace(cfg, correction=CorrectionConfig(seed=cfg.correction.seed), collect=None)
    reference = copy.deepcopy(model)
    prune_model(reference, calib, base_cfg, device)
    ref_hash = weights_hash(reference)
    differing = []
    for method in corrections():
        spec = correction.stats_spec(CorrectionConfig.of(method, seed=cfg.correction.seed))
        candidate = copy.deepcopy(model)
        prune_model(candidate, calib, replace(base_cfg, collect=spec), device)
        if weights_hash(candidate) != ref_hash:
            differing.append(method)
    return Check("correction none: identical model in every collection mode", not differing,
                 f"sha256 {ref_hash[:12]} for none/" + "/".join(corrections()) if not differing
                 else f"differs under the statistics of: {', '.join(differing)}")


def check_corrections_lower_error(model, calib, cfg: PruneConfig, device) -> list[Check]:
    out = []
    for method in corrections():
        run_cfg = replace(cfg, correction=CorrectionConfig.of(method, seed=cfg.correction.seed))
        layers = prune_model(copy.deepcopy(model), calib, run_cfg, device).layers
        diags = [l.correction for l in layers]
        worse = [l.name for l, d in zip(layers, diags) if not d["error_after"] <= d["error_before"]]
        accepted = sum(1 for d in diags if d["status"] == "accepted")
        strict = all(d["error_after"] < d["error_before"] for d in diags if d["status"] == "accepted")
        out.append(Check(f"{method}: corrected layers have lower error", not worse and strict,
                         f"{accepted}/{len(diags)} accepted, {sum(d['reverted'] for d in diags)} reverted"
                         + (f"; worse: {', '.join(worse)}" if worse else "")))
    return out


def run_checks(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, device: torch.device,
               progress: Callable[[str], None] = lambda name: None) -> list[Check]:
    """Run every check on copies of ``model`` (the model itself is left untouched)."""
    checks = []
    for name, fn in (("l2", check_l2_salience), ("incremental", check_incremental), ("none", check_none_identical)):
        progress(name)
        checks.append(fn(model, calib, cfg, device))
    progress("corrections")
    checks.extend(check_corrections_lower_error(model, calib, cfg, device))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed} passed, {len(checks) - passed} failed")
    return "\n".join(lines)
