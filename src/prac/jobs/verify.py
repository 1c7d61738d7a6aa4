"""The invariants every run relies on, checked on a given model and calibration set (``prac verify``).

0. The weights have the shapes the config gives (blocks, heads, MLP width), and the logits are finite.
1. Wanda's L2 salience from the running sum of squares equals the one from diag(H) (≤ 1e-5 relative).
2. Statistics accumulated batch by batch equal those accumulated in one shot (≤ 1e-5 relative).
3. With correction ``none`` every method's collection mode (Hessian, stored samples) yields the
   identical model, bit for bit, as the plain run that holds out the same sequences (if it holds any out).
4. Every corrected layer ends with a lower error than uncorrected (or is reverted to it), on the
   calibration tokens and on the held-out share it was not fitted to.
5. Block-wise reconstruction (``--reconstruct``; a one-epoch ``block`` run when none is configured)
   leaves every pruned weight exactly zero: each layer has at least as many zeros as its mask.

Under ``torchrun`` (``session``: a :class:`prac.parallel.session.Session`) every check runs data-parallel:
the pruning runs of checks 1, 3 and 4 are the data-parallel prune (statistics reduced, each group
checked by its owner, the worst case gathered), and check 2 compares each rank's batches with its
own share in one shot; every rank ends with the same table.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prac import correction
from prac.correction import CorrectionConfig, corrections
from prac.engine.loop import calibrate
from prac.engine.pipeline import PruneConfig, prune_model
from prac.model import shrink
from prac.model.group import InputGroup
from prac.model.shrink import shape_mismatches
from prac.model.stats import InputStats, StatsSpec

if TYPE_CHECKING:
    from prac.parallel.session import Session

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


def _parallel(session: Session | None):
    """A fresh data-parallel engine hook for one pruning run (None in one process)."""
    if session is None:
        return None
    from prac.parallel.data_parallel import DataParallel

    return DataParallel(session)


def _worst(session: Session | None, worst: list) -> list:
    """The largest ``[value, where]`` over every rank (each rank saw the groups it owns)."""
    if session is None:
        return worst
    return max(session.all_gather_objects(worst, "worst case of a check"), key=lambda w: w[0])


def check_l2_salience(model, calib, cfg: PruneConfig, device, session: Session | None = None) -> Check:
    worst: list[Any] = [0.0, ""]

    def observe(group: InputGroup) -> None:
        st = group.stats
        rel = float((st.l2.double() - st.hessian.diagonal().clamp_min(0).sqrt().double()).abs().max()
                    / st.l2.double().max().clamp_min(1e-30))
        if rel >= worst[0]:
            worst[:] = [rel, group.names[0]]

    prune_model(copy.deepcopy(model), calib, replace(cfg, collect=StatsSpec(hessian=True)), device, observer=observe,
                parallel=_parallel(session))
    worst = _worst(session, worst)
    return Check("L2 salience: sum of squares vs diag(H)", worst[0] <= TOLERANCE,
                 f"max relative difference {worst[0]:.2e} ({worst[1]})")


class _RecordingStats(InputStats):
    """Statistics that also keep every row they were given, to redo them in one shot."""

    def __init__(self, dim: int, device: torch.device, spec: StatsSpec):
        super().__init__(dim, device, spec)
        self.rows: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor, held: torch.Tensor | None = None, route=None) -> None:
        super().add_batch(x, held, route)
        self.rows.append(self._rows(x.detach(), route))


def check_incremental(model, calib, cfg: PruneConfig, device, session: Session | None = None) -> Check:
    """Block 0's linear inputs, accumulated per batch vs in one ``add_batch`` of all tokens (of this
    rank's share, under torchrun)."""
    spec = StatsSpec(hessian=True)
    if session is not None:
        calib = calib[_parallel(session).share(calib.shape[0], calib.shape[1], cfg.engine.batch_size)]
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
    worst = _worst(session, [worst])[0]
    return Check("incremental vs one-shot statistics", worst <= TOLERANCE,
                 f"max relative difference {worst:.2e} over {len(groups)} inputs of block 0")


def check_none_identical(model, calib, cfg: PruneConfig, device, session: Session | None = None) -> Check:
    base_cfg = replace(cfg, correction=CorrectionConfig(seed=cfg.correction.seed), collect=None)
    hashes: dict[tuple[float, int], str] = {}

    def reference_hash(holdout: float, seed: int) -> str:
        """The plain run's weights on the same held-out split: held-out sequences are fitted by
        nothing (prac.model.stats), so a collection mode with a held-out share is compared with the run
        that leaves the same sequences out and collects nothing else."""
        if (holdout, seed) not in hashes:
            reference = copy.deepcopy(model)
            collect = StatsSpec(seed=seed, holdout=holdout) if holdout else None
            prune_model(reference, calib, replace(base_cfg, collect=collect), device, parallel=_parallel(session))
            hashes[holdout, seed] = weights_hash(reference)
        return hashes[holdout, seed]

    ref_hash = reference_hash(0.0, cfg.correction.seed)
    differing = []
    for method in corrections():
        spec = correction.stats_spec(CorrectionConfig.of(method, seed=cfg.correction.seed))
        candidate = copy.deepcopy(model)
        prune_model(candidate, calib, replace(base_cfg, collect=spec), device, parallel=_parallel(session))
        if weights_hash(candidate) != reference_hash(spec.holdout, spec.seed):
            differing.append(method)
    return Check("correction none: identical model in every collection mode", not differing,
                 f"sha256 {ref_hash[:12]} for none/" + "/".join(corrections()) if not differing
                 else f"differs under the statistics of: {', '.join(differing)}")


def check_corrections_lower_error(model, calib, cfg: PruneConfig, device,
                                  session: Session | None = None) -> list[Check]:
    out = []
    for method in corrections():
        run_cfg = replace(cfg, correction=CorrectionConfig.of(method, seed=cfg.correction.seed))
        layers = prune_model(copy.deepcopy(model), calib, run_cfg, device, parallel=_parallel(session)).layers
        diags = [layer.correction for layer in layers]
        worse = [layer.name for layer, d in zip(layers, diags) if not d["error_after"] <= d["error_before"]]
        accepted = sum(1 for d in diags if d["status"] == "accepted")
        strict = all(d["error_after"] < d["error_before"] for d in diags if d["status"] == "accepted")
        # ... and, where a share was held out, lower error on the tokens the correction did not fit
        held = all(d["heldout_error_after"] < d["heldout_error_before"]
                   for d in diags if d["status"] == "accepted" and "heldout_error_before" in d)
        out.append(Check(f"{method}: corrected layers have lower error", not worse and strict and held,
                         f"{accepted}/{len(diags)} accepted, {sum(d['reverted'] for d in diags)} reverted, "
                         f"{sum(d.get('refused', False) for d in diags)} refused on held-out tokens"
                         + (f"; worse: {', '.join(worse)}" if worse else "")))
    return out


def check_reconstruction_keeps_masks(model, calib, cfg: PruneConfig, device, session: Session | None = None,
                                     tuning=None) -> Check:
    from prac.engine.reconstruct import ReconstructConfig
    from prac.model.units import model_units

    tuning = tuning or (cfg.engine.reconstruct if cfg.engine.reconstruct.active else ReconstructConfig("block", 1, 1))
    run_cfg = replace(cfg, engine=replace(cfg.engine, reconstruct=tuning))
    pruned = copy.deepcopy(model)
    outcome = prune_model(pruned, calib, run_cfg, device, parallel=_parallel(session))
    zeros = {name: int((unit.read() == 0).sum()) for _b, _i, units in model_units(pruned, cfg.ignore)
             for name, unit in units.items()}
    short = [r.name for r in outcome.layers if zeros.get(r.name, 0) < round(r.sparsity * r.numel)]
    kept = sum(r.kept for r in outcome.reconstruction)
    return Check(f"{tuning.mode} reconstruction keeps pruned weights zero", not short,
                 f"{len(outcome.layers)} layers, tuning kept in {kept}/{len(outcome.reconstruction)} blocks"
                 + (f"; weights left their mask: {', '.join(short[:3])}" if short else ""))


def check_shapes(model: nn.Module, calib: torch.Tensor) -> Check:
    """The weights have the shapes the config says (a structured folder: :func:`prac.model.shrink.shape_mismatches`),
    and the model's logits on the first 64 tokens of the first calibration sequence are finite (where
    the model is: a forward of the whole model, without the block engine)."""
    found = shape_mismatches(model)
    if found:
        return Check("shapes match the config", False, f"{len(found)} mismatches, first: {found[0]}")
    here = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=calib[:1, :64].to(here)).logits
    finite = bool(torch.isfinite(logits).all())
    cfg = shrink.text_config(model.config)
    return Check("shapes match the config", finite,
                 f"{len(model.get_decoder().layers)} blocks as configured"
                 + (f", intermediate {cfg.intermediate_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads"
                    if getattr(cfg, "model_type", None) in shrink.SUPPORTED else "")
                 + ("; logits finite" if finite else "; logits NOT finite"))


def run_checks(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, device: torch.device,
               progress: Callable[[str], None] = lambda name: None, session: Session | None = None,
               reconstruct=None) -> list[Check]:
    """Run every check on copies of ``model`` (the model itself is left untouched); ``session``: one
    rank of a data-parallel run (``calib`` is the whole calibration set on every rank)."""
    progress("shapes")
    checks = [check_shapes(model, calib)]
    for name, fn in (("l2", check_l2_salience), ("incremental", check_incremental), ("none", check_none_identical)):
        progress(name)
        checks.append(fn(model, calib, cfg, device, session))
    progress("corrections")
    checks.extend(check_corrections_lower_error(model, calib, cfg, device, session))
    progress("reconstruction")
    checks.append(check_reconstruction_keeps_masks(model, calib, cfg, device, session, reconstruct))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed} passed, {len(checks) - passed} failed")
    return "\n".join(lines)
