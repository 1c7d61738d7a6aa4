"""Non-uniform sparsity: how much of each layer to prune, at the same total, from a dense scan.

An allocator turns the statistics of the dense model (one calibrate-only pass through the block
engine, nothing pruned) into a plan: a sparsity per linear whose weighted total equals the asked
sparsity. The plan is then handed to the pruning run (:class:`prac.engine.pipeline.PruneConfig.plan`);
every mask source and correction works with it as with a uniform pattern.

- ``uniform``: every linear the asked sparsity.
- ``owl`` (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): a block's *outlier ratio* is the
  share of its Wanda scores |W|·‖X‖ above ``m`` times their mean (per linear); ratios are rescaled
  to ``[0, 2λ]``, centred on the asked density, and a block with more outliers keeps more weights:
  ``s_b = s − (r_b − mean r)``. Every linear of a block gets the block's sparsity.
- ``error``: measured reconstruction error. Each linear is pruned (Wanda mask, no update) at a few
  trial sparsities around the target on its dense H, giving its relative output error at each;
  the plan minimises the summed error at the asked total (a Lagrangian choice among the trials,
  then one common shift to hit the total). Per linear, so q/k/v/o and the MLP projections differ.

Totals: every plan's pruned-weight count ``Σ round(s_l · n_l)`` equals ``round(s · Σ n_l)``
exactly (largest-remainder rounding), i.e. within one weight per layer of the continuous target.
Masks then round each *row's* share (row scope) or each matrix's (layer scope), so the realised
sparsity of a linear can differ from its plan by that rounding; the report gives both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prac.core.errors import PracError
from prac.correction.objective import quadratic_rows
from prac.engine.config import EngineConfig
from prac.engine.loop import BlockEngine
from prac.engine.reconstruct import ReconstructConfig
from prac.methods.masks import mask_from_scores, wanda_scores
from prac.methods.patterns import Unstructured
from prac.model.group import InputGroup
from prac.model.stats import StatsSpec
from prac.model.units import Unit, model_units

ALLOCATORS = ("uniform", "owl", "error")
#: Calibration sequences the ``error`` allocator's dense scan reads by default (the first ones).
ERROR_SCAN_SAMPLES = 16


@dataclass(frozen=True)
class AllocationConfig:
    """``method``: one of ALLOCATORS. OWL: ``owl_lambda`` (λ, the half-width of the sparsity range)
    and ``owl_m`` (M, the outlier threshold as a multiple of the mean score), the paper's LLaMA
    values 0.08 and 5 by default. Error: ``error_trials`` sparsity offsets around the target.
    ``max_sparsity`` caps any layer. ``scan_samples``: calibration sequences the dense scan reads
    (the first ones; 0 = all; None = :data:`ERROR_SCAN_SAMPLES` for ``error``, all for ``owl``): a
    plan needs each layer's error *curve*, which far fewer tokens than the pruning pass resolve
    well enough (measured in the README: 16 of 128 sequences give the same quality, 2.5× faster)."""

    method: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    error_trials: tuple[float, ...] = (-0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2)
    max_sparsity: float = 0.95
    scan_samples: int | None = None

    @property
    def scan(self) -> int:
        """Sequences the dense scan reads (0: all)."""
        if self.scan_samples is not None:
            return self.scan_samples
        return ERROR_SCAN_SAMPLES if self.method == "error" else 0

    @property
    def active(self) -> bool:
        """False for the uniform plan, which needs no dense scan."""
        return self.method != ALLOCATORS[0]

    def check(self, pattern) -> None:
        """N:M fixes every group's count: a non-uniform allocation cannot apply."""
        if self.active and not isinstance(pattern, Unstructured):
            raise PracError(f"--allocation {self.method} needs unstructured sparsity; {pattern} is N:M "
                            "(non-uniform allocation does not apply to N:M)")

    def __post_init__(self) -> None:
        if self.method not in ALLOCATORS:
            raise PracError(f"unknown allocation {self.method!r}: choose from {', '.join(ALLOCATORS)}")
        if not 0 <= self.owl_lambda < 0.5 or not self.owl_m > 0:
            raise PracError(f"OWL needs 0 <= lambda < 0.5 and M > 0, got {self.owl_lambda}, {self.owl_m}")
        if not 0 < self.max_sparsity < 1:
            raise PracError(f"max sparsity must be in (0, 1), got {self.max_sparsity}")
        if self.scan_samples is not None and self.scan_samples < 0:
            raise PracError(f"allocation scan samples must be >= 0 (0: all), got {self.scan_samples}")


@dataclass
class Plan:
    """Sparsity per linear (full module name), with the sizes and the per-block view for the report."""

    method: str
    target: float
    sparsity: dict[str, float]
    numel: dict[str, int]
    block_of: dict[str, int]
    detail: dict = field(default_factory=dict)

    def total(self) -> float:
        n = sum(self.numel.values())
        return sum(round(self.sparsity[k] * self.numel[k]) for k in self.sparsity) / n if n else 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "target": self.target, "achieved_total": self.total(),
                "sparsity": self.sparsity, "detail": self.detail}


def quantise(target: float, raw: dict[str, float], numel: dict[str, int], cap: float) -> dict[str, float]:
    """Shift ``raw`` by one constant (clipped to [0, cap]) so the weighted mean is ``target``, then
    round to whole weights with the largest remainders so ``Σ round(s·n) = round(target · Σ n)``."""
    names = list(raw)
    n_total = sum(numel[k] for k in names)
    want = round(target * n_total)

    def total(shift: float) -> float:
        return sum(min(max(raw[k] + shift, 0.0), cap) * numel[k] for k in names)

    lo, hi = -1.0, 1.0
    for _ in range(100):  # total(shift) is monotone: bisect the shift
        mid = (lo + hi) / 2
        if total(mid) < want:
            lo = mid
        else:
            hi = mid
    exact = {k: min(max(raw[k] + hi, 0.0), cap) * numel[k] for k in names}
    counts = {k: math.floor(v) for k, v in exact.items()}
    missing = want - sum(counts.values())
    order = sorted(names, key=lambda k: (-(exact[k] - counts[k]), names.index(k)))
    for k in order[: max(missing, 0)]:
        counts[k] += 1
    return {k: counts[k] / numel[k] for k in names}


def _owl_ratio(weight: torch.Tensor, l2: torch.Tensor, m: float) -> tuple[int, int]:
    scores = wanda_scores(weight, l2)
    return int((scores > m * scores.mean()).sum()), scores.numel()


def allocate(model: nn.Module, calib: torch.Tensor, target: float, config: AllocationConfig,
             engine: EngineConfig | None = None, device: torch.device | str = "cpu", ignore: str | None = None,
             progress=None) -> Plan:
    """The plan of ``config.method`` for ``model`` at total sparsity ``target`` (one dense scan)."""
    if engine is None:
        engine = EngineConfig()
    numel, block_of = {}, {}
    for _blocks, i, units in model_units(model, ignore):
        for name, unit in units.items():
            numel[name] = unit.numel
            block_of[name] = i
    if not numel:
        raise PracError("nothing to prune: no linear layer is left to allocate sparsity to")
    if config.method == "uniform":
        return Plan("uniform", target, quantise(target, {k: target for k in numel}, numel, config.max_sparsity),
                    numel, block_of)
    spec = StatsSpec(hessian=config.method == "error")
    collected: dict[str, object] = {}
    observe = _owl_observer(config, collected) if config.method == "owl" else _error_observer(config, target, collected)
    # a dense scan: one stream, one pass, nothing tuned
    engine = dataclasses.replace(engine, sequential=False, dense_target=False, reconstruct=ReconstructConfig())
    runner = BlockEngine(engine, device, progress) if progress is not None else BlockEngine(engine, device)
    if config.scan:
        calib = calib[: config.scan]
    runner.run(model, calib, spec, observe, ignore=ignore)  # a dense scan: the step changes nothing
    plan = (_owl_plan if config.method == "owl" else _error_plan)(target, config, collected, numel, block_of)
    plan.detail["scan_sequences"] = int(calib.shape[0])
    return plan


Observer = Callable[[InputGroup, dict[str, Unit]], None]


def _owl_observer(config: AllocationConfig, out: dict) -> Observer:
    def observe(group: InputGroup, units: dict[str, Unit]) -> None:
        for name in group.names:
            out[name] = _owl_ratio(units[name].read().to(group.device), group.stats.l2, config.owl_m)

    return observe


def _error_observer(config: AllocationConfig, target: float, out: dict) -> Observer:
    trials = sorted({min(max(target + t, 0.0), config.max_sparsity) for t in config.error_trials})

    def observe(group: InputGroup, units: dict[str, Unit]) -> None:
        h = group.hessian()
        for name in group.names:
            w = units[name].read().to(h.device)
            scores = wanda_scores(w, group.stats.l2)
            energy = float(quadratic_rows(w, h).sum())  # once per linear, not per trial
            curve = []
            for s in trials:  # one [out, in] product per trial, so memory stays at one weight's size
                removed = w.masked_fill(~mask_from_scores(scores, Unstructured(s)), 0.0)  # W₀ − W_s
                curve.append((s, float(quadratic_rows(removed, h).sum()) / energy if energy > 0 else 0.0))
            out[name] = curve

    return observe


def _owl_plan(target, config, ratios, numel, block_of) -> Plan:
    per_block: dict[int, list[int]] = {}
    for name, (hits, size) in ratios.items():
        agg = per_block.setdefault(block_of[name], [0, 0])
        agg[0] += hits
        agg[1] += size
    blocks = sorted(per_block)
    ratio = torch.tensor([per_block[b][0] / per_block[b][1] for b in blocks], dtype=torch.float64)
    spread = float(ratio.max() - ratio.min())
    scaled = (ratio - ratio.min()) / spread * (2 * config.owl_lambda) if spread > 0 else torch.zeros_like(ratio)
    block_sparsity = {b: target - float(scaled[i] - scaled.mean()) for i, b in enumerate(blocks)}
    raw = {name: block_sparsity[block_of[name]] for name in numel}
    detail = {"lambda": config.owl_lambda, "M": config.owl_m,
              "outlier_ratio": {str(b): float(ratio[i]) for i, b in enumerate(blocks)}}
    return Plan("owl", target, quantise(target, raw, numel, config.max_sparsity), numel, block_of, detail)


def _error_plan(target, config, curves, numel, block_of) -> Plan:
    names = list(numel)
    want = target * sum(numel.values())

    def choose(mu: float) -> dict[str, float]:
        # Each linear: the trial minimising its error minus mu per pruned weight (relative errors are
        # per unit of output energy, so they are compared per weight of the layer).
        out = {}
        for k in names:
            out[k] = min(curves[k], key=lambda se: se[1] - mu * se[0])[0]
        return out

    lo, hi = 0.0, 1.0
    while sum(choose(hi)[k] * numel[k] for k in names) < want and hi < 1e9:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(choose(mid)[k] * numel[k] for k in names) < want:
            lo = mid
        else:
            hi = mid
    raw = choose(hi)
    detail = {"trials": {k: [[s, e] for s, e in curves[k]] for k in names}}
    return Plan("error", target, quantise(target, raw, numel, config.max_sparsity), numel, block_of, detail)
