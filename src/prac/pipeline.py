"""The one sequential pruning loop, shared by every method and architecture.

Block k is calibrated on the outputs of the already pruned blocks 0..k-1: its inputs are run
through it with hooks that feed one :class:`InputStats` per distinct linear input; every linear
is pruned (and corrected) from those statistics; then the block's outputs are recomputed with
the pruned weights and become the next block's inputs. Only one block is on the compute device
at a time; calibration activations stay on the device when they fit, else on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from prac.blocks import (
    BlockInputs,
    Blocks,
    capture_block_inputs,
    find_blocks,
    find_linears,
    get_weight,
    group_by_input,
    in_features,
    run_block,
    set_weight,
)
from prac.correction.base import CorrectionConfig
from prac.correction.objective import relative_error
from prac.errors import PracError
from prac.masks import wanda_scores
from prac.methods import MethodSettings, get_method
from prac.patterns import Pattern, Unstructured
from prac.progress import Progress, no_progress
from prac.stats import InputStats, StatsSpec

log = logging.getLogger(__name__)

StatsObserver = Callable[[list[str], InputStats], None]
"""Called with each group of linears and their collected statistics (verification, analysis)."""


@dataclass(frozen=True)
class PruneConfig:
    """Everything the pruning loop needs besides the model and the calibration tokens."""

    method: str = "wanda"
    pattern: Pattern = Unstructured(0.5)
    settings: MethodSettings = MethodSettings()
    correction: CorrectionConfig = CorrectionConfig()
    ignore: str | None = None
    batch_size: int = 8
    offload: str = "auto"  # where calibration activations live: auto | device | cpu
    collect: StatsSpec | None = None  # extra statistics to collect regardless of need (verification)


@dataclass
class PruneOutcome:
    layers: list[dict[str, Any]] = field(default_factory=list)
    blocks_path: str = ""
    activation_device: str = "cpu"
    phase_seconds: dict[str, float] = field(default_factory=dict)
    final_hidden: list[torch.Tensor] | None = None


class PhaseTimer:
    """Wall time per phase (capture, transfer, calibrate, prune, propagate), synchronised on CUDA."""

    def __init__(self, device: torch.device, totals: dict[str, float]):
        self.device, self.totals = device, totals

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def check_pattern(model: nn.Module, pattern: Pattern, ignore: str | None = None) -> Blocks:
    """Fail before any work if the pattern cannot apply to some prunable layer."""
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.modules):
        for name, module in find_linears(block, blocks.name(i), ignore).items():
            pattern.check(in_features(module), name)
    return blocks


def stats_spec_for(cfg: PruneConfig) -> StatsSpec | None:
    """What the statistics accumulators must hold, or None if no calibration pass is needed."""
    method = get_method(cfg.method)
    spec = StatsSpec(hessian=method.needs_hessian, seed=cfg.correction.seed)
    needed = method.needs_stats
    if cfg.correction.method != "none":
        from prac import correction

        spec = spec.union(correction.stats_spec(cfg.correction))
        needed = True
    if cfg.collect is not None:
        spec = spec.union(cfg.collect)
        needed = True
    return spec if needed else None


def _activation_store(cfg: PruneConfig, device: torch.device, calib: torch.Tensor, hidden: int, dtype) -> torch.device:
    if cfg.offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if cfg.offload == "device":
        return device
    need = 2 * calib.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


def prune_model(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: PruneConfig,
    device: torch.device,
    progress: Progress = no_progress,
    return_hidden: bool = False,
    observer: StatsObserver | None = None,
) -> PruneOutcome:
    """Prune ``model`` in place, block by block, from calibration token ids ``[n, seqlen]``."""
    method = get_method(cfg.method)
    blocks = check_pattern(model, cfg.pattern, cfg.ignore)
    spec = stats_spec_for(cfg)
    outcome = PruneOutcome(blocks_path=blocks.path)
    timer = PhaseTimer(device, outcome.phase_seconds)
    inputs: BlockInputs | None = None
    if spec is not None or return_hidden:
        hidden_size = model.get_input_embeddings().weight.shape[1]
        store = _activation_store(cfg, device, calib, hidden_size, next(model.parameters()).dtype)
        outcome.activation_device = str(store)
        with timer("capture"):
            inputs = capture_block_inputs(model, blocks, calib.split(cfg.batch_size), device, store)
    last = len(blocks) - 1
    for i in progress(range(len(blocks)), "blocks", len(blocks)):
        block = blocks.modules[i]
        with timer("transfer"):
            block.to(device)
        linears = find_linears(block, blocks.name(i), cfg.ignore)
        if spec is None:
            with timer("prune"):
                staged = {name: _prune_linear(name, m, None, cfg, method) for name, m in linears.items()}
        else:
            staged = _prune_block_calibrated(block, linears, inputs, spec, cfg, method, device, observer, timer)
        for name, (weight, record) in staged.items():
            set_weight(linears[name], weight)
            outcome.layers.append(record)
        if inputs is not None and (i < last or return_hidden):
            with timer("propagate"):
                _propagate(block, inputs, device)
        with timer("transfer"):
            block.to("cpu")
    if return_hidden and inputs is not None:
        outcome.final_hidden = inputs.hidden
    return outcome


def _propagate(block: nn.Module, inputs: BlockInputs, device: torch.device) -> None:
    with torch.no_grad():
        for j in range(len(inputs)):
            store = inputs.hidden[j].device
            inputs.hidden[j] = run_block(block, inputs, j, device).to(store)


def _prune_block_calibrated(block, linears, inputs, spec, cfg, method, device, observer, timer) -> dict:
    if not linears:
        return {}
    groups = group_by_input(block, linears, inputs, device)
    per_chunk = cfg.correction.layer_batch_size or len(groups)
    staged: dict[str, tuple[torch.Tensor, dict]] = {}
    for start in range(0, len(groups), per_chunk):
        chunk = groups[start : start + per_chunk]
        with timer("calibrate"):
            stats = _collect(block, chunk, linears, inputs, spec, device)
        for group, st in zip(chunk, stats):
            if observer is not None:
                observer(group, st)
            for name in group:
                if st.count == 0:
                    log.warning("%s is never called in the block's forward: left dense", name)
                    continue
                st.check_finite(name)
                with timer("prune"):
                    staged[name] = _prune_linear(name, linears[name], st, cfg, method)
        del stats
    return staged


def _collect(block, chunk, linears, inputs, spec, device) -> list[InputStats]:
    """One forward over all calibration batches, with one accumulator per group in ``chunk``."""
    stats = [InputStats(in_features(linears[g[0]]), device, spec) for g in chunk]
    handles = []
    for group, st in zip(chunk, stats):
        def hook(_m, args, _st=st):
            _st.add_batch(args[0])
        handles.append(linears[group[0]].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for j in range(len(inputs)):
                run_block(block, inputs, j, device)
    finally:
        for h in handles:
            h.remove()
    return stats


def _prune_linear(name, module, stats, cfg: PruneConfig, method) -> tuple[torch.Tensor, dict]:
    started = time.perf_counter()
    w_orig = get_weight(module)
    result = method.fn(w_orig, stats, cfg.pattern, cfg.settings)
    weight = result.weight
    record: dict[str, Any] = {"name": name, "shape": list(w_orig.shape)}
    if cfg.correction.method != "none":
        from prac import correction

        scores = wanda_scores(w_orig, stats.l2)
        corrected = correction.correct(w_orig, weight, result.mask, stats, scores, cfg.correction)
        weight = corrected.weight
        record["correction"] = corrected.diagnostics
        log.debug("%s", correction.format_diagnostics(name, corrected.diagnostics))
    if bool((weight[result.mask] != 0).any()):
        raise RuntimeError(f"internal error: pruned weights of {name} are not zero")
    record["sparsity"] = float(result.mask.float().mean())
    if result.info:
        record["method"] = result.info
    diagnostics = record.get("correction", {})
    if diagnostics.get("error_source") == "hessian":  # measured already, on the same H
        record["relative_error"] = diagnostics["error_after"]
    elif stats is not None and stats.hessian is not None:
        record["relative_error"] = relative_error(weight, w_orig, stats.hessian)
    record["seconds"] = round(time.perf_counter() - started, 6)
    return weight, record
