"""Pruning through the block engine: the step that prunes (and corrects) one input group.

The engine (:mod:`prac.engine.loop`) does the model plumbing: capture, statistics per input group, apply,
propagate. This module is what a pruning run hands it: for each group, every linear gets its
mask from the chosen mask source (``methods.py``) and, optionally, a correction
(``correction/``), both reading the group's shared statistics, H and factorisations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.core.records import LayerRecord
from prac.core.timing import PhaseTimer
from prac.correction.config import CorrectionConfig
from prac.correction.objective import relative_error
from prac.engine.config import EngineConfig, StatsReducer
from prac.engine.loop import BlockEngine, check_pattern_fits
from prac.methods.masks import MaskResult, wanda_scores
from prac.methods.patterns import NM, Pattern, Unstructured
from prac.methods.registry import Method, get_method, shared_factor
from prac.methods.sparsegpt import SparseGPTConfig
from prac.model.blocks import Blocks
from prac.model.group import InputGroup
from prac.model.stats import StatsSpec
from prac.model.units import Unit
from prac.quant.gptq import ColumnQuantizer, QuantConfig, check_blocks, gptq_on_mask

if TYPE_CHECKING:
    from prac.parallel.data_parallel import DataParallel

log = logging.getLogger(__name__)

StatsObserver = Callable[[InputGroup], None]
"""Called with each input group and its collected statistics before it is pruned (verification, analysis)."""


@dataclass(frozen=True)
class PruneConfig:
    """Everything a pruning run needs besides the model and the calibration tokens.

    ``settings``: the mask source's own settings dataclass (None: its defaults); ``engine``: how the
    block engine runs; ``collect``: extra statistics to collect regardless of need (verification,
    ``--measure``); ``plan``: per-linear unstructured sparsity (full module name -> sparsity) that
    overrides ``pattern`` for the linears it names (a non-uniform allocation, see ``allocation.py``);
    ``dense_target_damping``: the relative ridge of :func:`dense_target_weight` (with
    ``engine.dense_target``); ``quant``: quantize the survivors (:mod:`prac.quant.gptq`; jointly with
    SparseGPT's sweep when nothing changes its weights after it, else a GPTQ pass on the final mask,
    after the correction — or after the block's reconstruction, on statistics collected again).
    """

    method: str = "wanda"
    pattern: Pattern = Unstructured(0.5)
    settings: Any = None
    correction: CorrectionConfig = CorrectionConfig()
    ignore: str | None = None
    engine: EngineConfig = EngineConfig()
    collect: StatsSpec | None = None
    plan: Mapping[str, float] | None = None
    dense_target_damping: float = 1e-2
    quant: QuantConfig = QuantConfig()

    def __post_init__(self) -> None:
        if not self.dense_target_damping > 0:
            raise PracError(f"dense-target damping must be > 0, got {self.dense_target_damping}")
        if self.plan is not None and not isinstance(self.pattern, Unstructured):
            raise PracError(f"a non-uniform sparsity allocation needs unstructured sparsity; {self.pattern} is N:M")
        entry = get_method(self.method)
        if self.settings is None:
            object.__setattr__(self, "settings", entry.settings())
        elif not isinstance(self.settings, entry.settings):
            raise PracError(f"method {self.method!r} takes {entry.settings.__name__}, got {type(self.settings).__name__}")
        if entry.sweeps_blocks(self.settings) and isinstance(self.pattern, NM) and self.settings.blocksize % self.pattern.m:
            raise PracError(f"--blocksize {self.settings.blocksize} must be a multiple of M={self.pattern.m} "
                            f"for {self.pattern} sparsity")


@dataclass
class PruneOutcome:
    layers: list[LayerRecord] = field(default_factory=list)
    blocks_path: str = ""
    activation_device: str = "cpu"
    phase_seconds: dict[str, float] = field(default_factory=dict)
    final_hidden: list[torch.Tensor] | None = None
    factorisations: dict[str, int] = field(default_factory=dict)  # Cholesky attempts per input group
    block_weights: tuple[int, int] = (0, 0)  # (zeros, entries) over every weight matrix of the blocks
    reconstruction: list = field(default_factory=list)  # prac.engine.reconstruct.ReconstructRecord per block
    cache_peak_bytes: int = 0  # replay's kept outputs at their largest (included in the peak memory)
    resident: bool = False  # the blocks stayed on the device for the whole run
    grids: dict = field(default_factory=dict)  # name -> prac.quant.gptq.ColumnQuantizer of each quantized linear


def check_pattern(model: nn.Module, pattern: Pattern, ignore: str | None = None) -> Blocks:
    """Fail before any work if the pattern cannot apply to some prunable layer."""
    return check_pattern_fits(model, lambda name, unit: pattern.check(unit.in_features, name), ignore)


def sweep_blocksize(cfg: PruneConfig) -> int:
    """The column block of the quantizing sweep: the method's ``--blocksize`` (:meth:`Method.sweep_blocksize`)."""
    return get_method(cfg.method).sweep_blocksize(cfg.settings)


def check_quant(model: nn.Module, quant: QuantConfig, ignore: str | None = None, blocksize: int = 128) -> None:
    """Fail before any work when the quantization grid cannot apply to some prunable layer, or its
    groups do not fit the sweep's column blocks (``blocksize``)."""
    if quant.active:
        def check(name: str, unit: Unit) -> None:
            quant.check(unit.in_features, name)
            check_blocks(quant, blocksize, unit.in_features)

        check_pattern_fits(model, check, ignore)


def stats_spec_for(cfg: PruneConfig) -> StatsSpec | None:
    """What the statistics accumulators must hold, or None if no calibration pass is needed."""
    from prac.correction import stats_spec

    spec = get_method(cfg.method).stats
    if cfg.correction.active:
        spec = stats_spec(cfg.correction) if spec is None else spec.union(stats_spec(cfg.correction))
    if cfg.collect is not None:
        spec = cfg.collect if spec is None else spec.union(cfg.collect)
    if cfg.engine.dense_target:
        need = StatsSpec(hessian=True, drift=True)
        spec = need if spec is None else spec.union(need)
    if cfg.quant.active:  # GPTQ's H
        spec = StatsSpec(hessian=True) if spec is None else spec.union(StatsSpec(hessian=True))
    if cfg.engine.reconstruct.active:  # the calibration pass, and the held-out draw it is judged on
        need = StatsSpec(holdout=cfg.engine.reconstruct.holdout)
        spec = need if spec is None else spec.union(need)
    if spec is not None:
        spec = StatsSpec(spec.hessian, spec.max_samples, cfg.correction.seed, spec.holdout, spec.drift)
    return spec


def held_out_sequences(cfg: PruneConfig, n: int) -> torch.Tensor | None:
    """Which of the ``n`` calibration sequences a run of ``cfg`` holds out to judge on (a correction's
    or the reconstruction's share, :func:`prac.model.stats.holdout_rows`; bool ``[n]``), None when none:
    they enter no statistic anything is fitted on (masks, corrections, tuning, the allocation scan)."""
    spec = stats_spec_for(cfg)
    return spec.held_rows(n) if spec is not None else None


def dense_target_weight(weight: torch.Tensor, group: InputGroup, damping: float = 1e-2,
                        name: str | None = None) -> torch.Tensor:
    """The dense weights that best reproduce the *dense model's* output of this layer from the inputs it
    gets in the model being pruned (``--dense-target``).

    With X the layer's inputs here, X_d the same tokens' inputs in the dense model and W₀ its dense
    weights, ``‖X Wᵀ − X_d W₀ᵀ‖² + λ‖W − W₀‖²`` is, up to a constant, ``(W − W*)(H + λI)(W − W*)ᵀ``
    summed over rows, with ``H = XᵀX/N``, ``D = (X_d − X)ᵀX/N`` (the drift of the inputs) and

        W* = W₀ (H + D + λI)(H + λI)⁻¹ = W₀ + W₀ D (H + λI)⁻¹.

    So pruning W* on H (any mask source, any correction) reconstructs the dense model's output: the
    layer also takes up the error of the layers before it (the asymmetric objective of GPTAQ, arXiv
    2504.02692, here for pruning, reduced to a change of the dense weights). The factor is the
    group's shared damped inverse (one per group), the product ``D (H + λI)⁻¹`` is computed once
    per group. Falls back to W₀ when the factorisation fails. When the engine kept the product
    W₀ D per linear (``stats.drift_out``, for groups with fewer outputs than inputs), ``name`` picks
    this linear's and W* = W₀ + (W₀ D)(H + λI)⁻¹.
    """
    stats = group.stats

    def factor() -> torch.Tensor | None:
        inverse = group.inverse(damping)
        if inverse.value is None:
            log.warning("%s: (H + λI) could not be factorised; the layer keeps its own dense target", group.names[0])
        return inverse.value

    inverse = group.shared(("dense-target-inverse", float(damping)), factor)
    if inverse is None:
        return weight
    if stats.drift_out is not None:
        if name not in stats.drift_out:
            raise RuntimeError(f"no drift product was kept for {name}")
        product = (stats.drift_out[name] / max(stats.count, 1)).to(inverse.device)
        return weight + (product @ inverse).to(weight.device)
    g = group.shared(("dense-target", float(damping)),
                     lambda: (stats.drift / max(stats.count, 1)).to(group.device) @ inverse)
    return weight + weight.to(g.device) @ g


class PruneStep:
    """The engine's step for a pruning run: mask, correct and record every linear of a group."""

    def __init__(self, cfg: PruneConfig, observer: StatsObserver | None = None):
        self.cfg = cfg
        self.method: Method = get_method(cfg.method)
        self.observer = observer
        self.records: list[LayerRecord] = []
        self.factorisations: dict[str, int] = {}  # Cholesky attempts per input group (its first linear)
        # quantize in this step (else a pass after the block's reconstruction, :meth:`quantize_step`)
        self.quantize_here = cfg.quant.active and not cfg.engine.reconstruct.active
        self.grids: dict[str, Any] = {}  # name -> its ColumnQuantizer (scales, zero points) once quantized

    def __call__(self, group: InputGroup, units: dict[str, Unit]) -> dict[str, torch.Tensor]:
        if self.observer is not None and group.stats is not None:
            self.observer(group)
        swept = self._sweep_together(group, units)
        staged = {}
        for name in group.names:
            weight, record = self._prune_unit(units[name], group, swept.get(name))
            staged[name] = weight
            self.records.append(record)
        self.factorisations[group.names[0]] = group.factorisations
        return staged

    def _sweep_together(self, group: InputGroup,
                        units: dict[str, Unit]) -> dict[str, tuple[torch.Tensor, MaskResult, float]]:
        """Masks of the group's linears from one sweep where the method has one (SparseGPT: the
        same masks and weights as one by one, tests/test_sparsegpt_many.py): name -> (the weight it
        pruned, the result, seconds). Empty where they go one by one: a single linear, no
        statistics, quantized in the sweep, or where the method says joining does not pay
        (patterns it cannot join; on a CPU, too many rows in all)."""
        names = group.names
        method = self.method
        patterns = [self.pattern_of(n) for n in names]
        rows = [units[n].out_features for n in names]
        if (method.many is None or len(names) < 2 or group.stats is None or self._quantizes_in_sweep()
                or not method.joinable(patterns, rows, torch.device(group.device))):
            return {}
        started = time.perf_counter()
        weights = [self._target_weight(units[n], group) for n in names]
        results = method.many(weights, group, patterns, self.cfg.settings)
        rows = sum(w.shape[0] for w in weights)
        seconds = time.perf_counter() - started
        return {n: (w, r, seconds * w.shape[0] / rows) for n, w, r in zip(names, weights, results)}

    def pattern_of(self, name: str) -> Pattern:
        """The layer's pattern: its planned sparsity when the config has a plan naming it."""
        plan = self.cfg.plan
        return Unstructured(float(plan[name])) if plan is not None and name in plan else self.cfg.pattern

    def _quantizes_in_sweep(self) -> bool:
        return self.quantize_here and self.method.quantizes and not self.cfg.correction.active

    def _target_weight(self, unit: Unit, group: InputGroup) -> torch.Tensor:
        """The weight the method prunes: the unit's, or its dense-target weight (``--dense-target``)."""
        w = unit.read()
        stats = group.stats
        if stats is not None and (stats.drift is not None or stats.drift_out is not None):
            w = dense_target_weight(w, group, self.cfg.dense_target_damping, unit.name)
        return w

    def _prune_unit(self, unit: Unit, group: InputGroup,
                    swept: tuple[torch.Tensor, MaskResult, float] | None = None) -> tuple[torch.Tensor, LayerRecord]:
        """Mask (or take ``swept``: the weight, result and seconds of a joint sweep), correct and
        record one linear."""
        cfg = self.cfg
        name = unit.name
        started = time.perf_counter()
        stats = group.stats
        joint = self._quantizes_in_sweep()
        quant = None
        if swept is not None:
            w_orig, result, sweep_seconds = swept
            started -= sweep_seconds
        else:
            w_orig = self._target_weight(unit, group)
            quant = self._quantizer(unit, w_orig) if joint else None
            extra = {"quant": quant} if quant is not None else {}
            result = self.method.fn(w_orig, group if stats is not None else None, self.pattern_of(name), cfg.settings,
                                    **extra)
        weight = result.weight
        diagnostics: dict[str, Any] = {}
        if cfg.correction.active:
            from prac import correction

            scores = wanda_scores(w_orig, stats.l2)
            corrected = correction.correct(w_orig, weight, result.mask, group, scores, cfg.correction)
            weight, diagnostics = corrected.weight, corrected.diagnostics
            log.debug("%s", correction.format_diagnostics(name, diagnostics))
        if bool((weight[result.mask] != 0).any()):
            raise RuntimeError(f"internal error: pruned weights of {name} are not zero")
        row = result.mask.float().mean(dim=1)
        if diagnostics.get("error_source") == "hessian":  # measured already, on the same H
            error = diagnostics["error_after"]
        elif stats is not None and stats.hessian is not None:
            error = relative_error(weight, w_orig, stats.hessian)
        else:
            error = None
        quantized: dict[str, Any] = {}
        if joint:
            self.grids[name] = quant
            quantized = {**cfg.quant.describe(), "sweep": "joint"}
        elif self.quantize_here:
            before = error
            weight, quant, _ = gptq_on_mask(weight, result.mask, self._gptq_upper(group), cfg.quant,
                                            unit.weight.dtype, sweep_blocksize(cfg))
            self.grids[name] = quant
            error = relative_error(weight, w_orig, stats.hessian)
            quantized = {**cfg.quant.describe(), "sweep": "gptq on the mask", "error_unquantized": before}
        record = LayerRecord(
            name=name, shape=tuple(w_orig.shape), sparsity=float(result.mask.float().mean()),
            row_sparsity=(float(row.min()), float(row.max())) if row.numel() else (0.0, 0.0),
            seconds=round(time.perf_counter() - started, 6), group=group.names[0], relative_error=error,
            method=dict(result.info), correction=diagnostics, expert=_expert_info(unit, stats), quant=quantized,
        )
        return weight, record

    def _gptq_upper(self, group: InputGroup) -> torch.Tensor:
        """U of the GPTQ pass on a mask, at the run's ``--percdamp``: the very factor SparseGPT (or
        admm's block sweep, at the default damping) already made for this input, else made once."""
        settings = self.cfg.settings if isinstance(self.cfg.settings, SparseGPTConfig) else SparseGPTConfig()
        return shared_factor(group, settings).upper

    def _quantizer(self, unit: Unit, weight: torch.Tensor) -> ColumnQuantizer:
        return ColumnQuantizer(self.cfg.quant, unit.in_features, unit.out_features, unit.weight.dtype, weight.device)

    def quantize_step(self, group: InputGroup, units: dict[str, Unit]) -> dict[str, torch.Tensor]:
        """The pass after a block's reconstruction: GPTQ on each linear's final mask (its zeros), on
        statistics of the tuned block; the records of the prune are updated."""
        records = {r.name: r for r in self.records}
        staged = {}
        for name in group.names:
            unit = units[name]
            w = unit.read().to(group.device)
            weight, quant, _ = gptq_on_mask(w, w == 0, self._gptq_upper(group), self.cfg.quant, unit.weight.dtype,
                                            sweep_blocksize(self.cfg))
            self.grids[name] = quant
            staged[name] = weight
            if name in records:
                records[name].quant = {**self.cfg.quant.describe(), "sweep": "gptq on the mask, after reconstruction",
                                       "error_of_the_rounding": relative_error(weight, w, group.stats.hessian)}
        return staged


def _expert_info(unit: Unit, stats) -> dict[str, Any] | None:
    """The record's ``expert`` entry: where the projection lives and the tokens it was calibrated on."""
    slot = unit.expert
    if slot is None:
        return None
    out: dict[str, Any] = {"experts": slot.experts, "index": slot.index, "projection": slot.projection}
    if stats is not None:
        out["tokens"] = int(stats.count - stats.prior_tokens)
        out["prior_tokens"] = int(stats.prior_tokens)
    return out


def prune_model(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: PruneConfig,
    device: torch.device,
    progress: Progress = no_progress,
    return_hidden: bool = False,
    observer: StatsObserver | None = None,
    reduce: StatsReducer | None = None,
    parallel: DataParallel | None = None,
) -> PruneOutcome:
    """Prune ``model`` in place, block by block, from calibration token ids ``[n, seqlen]``.

    ``parallel`` (:class:`prac.parallel.data_parallel.DataParallel`): one rank of a data-parallel run — ``calib``
    is the whole calibration set (the rank takes its share), the observer sees only the groups this
    rank owns, ``final_hidden`` is this rank's share, and the records of every rank come back in the
    single-process order."""
    check_pattern(model, cfg.pattern, cfg.ignore)
    check_quant(model, cfg.quant, cfg.ignore, sweep_blocksize(cfg))
    spec = stats_spec_for(cfg)
    step = PruneStep(cfg, observer)
    outcome = PruneOutcome()
    engine = BlockEngine(cfg.engine, device, progress, reduce=reduce, parallel=parallel)
    finish = step.quantize_step if cfg.quant.active and not step.quantize_here else None
    run = engine.run(model, calib, spec, step, ignore=cfg.ignore, return_hidden=return_hidden, finish_step=finish,
                     timer=PhaseTimer(device, outcome.phase_seconds))
    if parallel is not None:
        step.records, step.factorisations = parallel.gather_records(step.records, step.factorisations)
    outcome.layers = step.records
    outcome.blocks_path = run.blocks_path
    outcome.activation_device = run.activation_device
    outcome.final_hidden = run.final_hidden
    outcome.factorisations = step.factorisations
    outcome.block_weights = run.block_weights
    outcome.reconstruction = run.reconstruction
    outcome.cache_peak_bytes, outcome.resident = run.cache_peak_bytes, run.resident
    outcome.grids = {k: v.cpu() for k, v in step.grids.items()}
    if parallel is not None and cfg.quant.active:
        outcome.grids = parallel.gather_grids(outcome.grids)
    if cfg.correction.active:
        from prac.correction.summary import run_warning

        message = run_warning([r.correction for r in outcome.layers])
        if message:
            log.warning("%s", message)
    return outcome
