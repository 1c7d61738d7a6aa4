"""The block engine: the one sequential loop every pruning run, dense scan and verification goes through.

For each block, in order:

1. transfer the block to the compute device (only one block is there at a time);
2. group its linears by the tensor they read (q/k/v, gate/up) — :class:`prac.model.group.InputGroup`;
3. for each chunk of groups: one forward over the calibration batches with one
   :class:`prac.model.stats.InputStats` accumulator per group;
4. ``reduce(group)``: the seam where statistics can be combined across processes (identity here);
5. ``step(group, linears)``: the caller's work on the group — prune and correct, or only observe
   (a calibrate-only pass); it returns the new weights of the group's linears (or nothing);
6. apply: once every group of the block is done, the new weights are written into the block
   (so with ``layer_batch_size`` every chunk is still calibrated on the dense block, as in one pass);
   with ``sequential`` every group is its own chunk, in forward order, and its new weights are
   written as soon as it is done, so q/k/v's pruning is seen by o_proj's statistics, attention's by
   the MLP's (SparseGPT's "true sequential");
7. propagate: recompute the block's outputs with its (new) weights; they become the next block's inputs.

In a sequential calibration the block's later forwards (each group's, then the propagation) reuse the
outputs of the submodules that are already final, on equal inputs (``replay``, :mod:`prac.engine.replay`):
the attention once q/k/v/o are pruned, gate/up once pruned. Exact, only the work is skipped.

With ``parallel`` (:class:`BlockParallel`, see ``prac.parallel.session``) the run is data-parallel: the
rank calibrates on its share of the samples, step 4 also reduces the statistics across ranks and
assigns each group an owner, step 5 runs on the owner only, and before step 6 the owners' new weights
are exchanged (``exchange``), so every rank applies the same weights and propagates its own share.

With ``dense_target`` a second stream of hidden states, the dense model's, runs beside the pruned
one: before step 2 the still dense block runs once over the dense stream, keeping every group's
input (its dense input, x_d) and replacing the stream by the block's output (the dense stream's
propagation); step 3 then also accumulates, per group, Σ (x_d − x) xᵀ for the same tokens
(:meth:`prac.model.stats.InputStats.add_drift`). The step can then reconstruct the dense model's output
(``prac.engine.pipeline.dense_target_weight``) instead of the current inputs' one.

Block k is thus calibrated on the outputs of the already processed blocks 0..k-1. A step of
``None`` is a dense scan: statistics of the unpruned model, block after block. Calibration
activations stay on the device when they fit, else on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseTimer
from prac.engine.reconstruct import ReconstructConfig, reconstruct_block, sublayers_of
from prac.engine.replay import Replay
from prac.engine.residency import BlockMover
from prac.model.blocks import (
    BlockInputs,
    Blocks,
    StopForward,
    block_output,
    capture_block_inputs,
    find_blocks,
    group_by_input,
    input_recorder,
    pre_hooks,
    run_block,
    run_block_until,
    stopping,
)
from prac.model.experts import Route, dense_gate_weights, expert_hidden, expert_views, gated
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec, holdout_rows
from prac.model.units import Unit, block_units, block_weight_counts, check_block_parameters, model_units

log = logging.getLogger(__name__)

GroupStep = Callable[[InputGroup, dict[str, Unit]], "dict[str, torch.Tensor] | None"]
"""``step(group, units)``: process one input group (``units`` maps every name of the block to its
:class:`prac.model.units.Unit`) and return the new fp32 ``[out, in]`` weights of the units it changed, or None."""

StatsReducer = Callable[[InputGroup], None]
"""``reduce(group)``: combine the group's statistics across processes, in place (identity by default)."""

StatsFactory = Callable[[int, torch.device, StatsSpec], InputStats]


class BlockParallel(Protocol):
    """Data-parallel hooks of the engine (implemented by :class:`prac.parallel.session.DataParallel`)."""

    def share(self, n: int, seqlen: int, batch_size: int) -> slice:
        """This process's share of the ``n`` calibration samples of ``seqlen`` tokens (whole batches)."""

    def new_stats(self, stats: InputStats) -> InputStats:
        """A fresh accumulator made consistent with this share (the sample's random keys)."""

    def assign(self, groups: list[InputGroup], units: dict[str, Unit]) -> None:
        """Choose the owner of each group of a chunk (the same on every process)."""

    def reduce(self, group: InputGroup) -> None:
        """Combine the group's statistics across processes (onto its owner at least)."""

    def reduce_all(self, stats: InputStats, name: str) -> None:
        """Combine statistics that several groups read (an experts module's prior) onto every process."""

    def owns(self, group: InputGroup) -> bool:
        """Whether this process runs the step of ``group``."""

    def exchange(self, staged: dict[str, torch.Tensor], units: dict[str, Unit]) -> dict[str, torch.Tensor]:
        """Every owner's new weights of the block, on every process."""

    def sum_tensors(self, tensors: list[torch.Tensor], what: str) -> None:
        """Sum each tensor over the processes, in place (reconstruction's counts)."""

    def sum_tree(self, nodes: list, template: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """The total of every process's part of one fixed summation tree (:mod:`prac.core.treesum`), on every
        process (reconstruction's gradients and errors)."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: ``batch_size`` sequences per forward; ``offload`` where calibration
    activations live (auto | device | cpu); ``layer_batch_size`` input groups whose statistics are
    held at once (0: every group of a block, one forward; k: one forward per k groups);
    ``sequential``: calibrate each group on the block with its earlier groups already pruned (one
    forward per group, in forward order; overrides ``layer_batch_size``); ``dense_target``: also run
    the dense model's stream of hidden states beside the pruned one (twice the activations, one more
    forward per block, and every group's dense inputs of the current block kept while it is pruned)
    so every layer can reconstruct the dense model's output, correcting the error of the layers
    before it. It implies ``sequential``:
    calibrated on the dense block, o_proj would correct the drift that the pruned q/k/v already
    take up (measured: worse than no dense target, see docs/admm.md). ``replay``: in a sequential
    calibration, keep the outputs of the submodules whose linears are final (attention once q/k/v/o
    are pruned, gate/up once pruned) and reuse them in the block's later forwards on equal inputs
    (:mod:`prac.engine.replay`; exact, costs memory up to a quarter of what is free where activations live).
    ``expert_min_tokens``: an MoE expert projection whose input got fewer calibration tokens than this
    has its statistics topped up to it with those of all the block's tokens run through it; one that
    got none is calibrated on those alone, whatever this is (0, the default: only those; None: the
    projection's number of inputs, below which its own H is singular; measured in docs/moe.md)."""

    batch_size: int = 8
    offload: str = "auto"
    layer_batch_size: int = 0
    sequential: bool = False
    dense_target: bool = False
    replay: bool = True
    expert_min_tokens: int | None = 0
    reconstruct: ReconstructConfig = ReconstructConfig()
    cache_budget: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PracError(f"batch size must be >= 1, got {self.batch_size}")
        if self.offload not in ("auto", "device", "cpu"):
            raise PracError(f"offload must be auto, device or cpu, got {self.offload!r}")
        if self.layer_batch_size < 0:
            raise PracError(f"layer-batch-size must be >= 0, got {self.layer_batch_size}")
        if self.cache_budget is not None and not self.cache_budget >= 0:
            raise PracError(f"cache budget must be >= 0 GiB, got {self.cache_budget}")
        if self.expert_min_tokens is not None and self.expert_min_tokens < 0:
            raise PracError(f"expert-min-tokens must be >= 0, got {self.expert_min_tokens}")


@dataclass
class EngineOutcome:
    blocks_path: str = ""
    activation_device: str = "cpu"
    phase_seconds: dict[str, float] = field(default_factory=dict)
    final_hidden: list[torch.Tensor] | None = None
    replayed: int = 0  # submodule calls answered from kept outputs (``EngineConfig.replay``)
    # (zeros, entries) over every weight matrix of the processed blocks, after processing
    block_weights: tuple[int, int] = (0, 0)
    reconstruction: list = field(default_factory=list)  # prac.engine.reconstruct.ReconstructRecord per block
    resident: bool = False  # every block's weights stayed on the device (prac.engine.residency)
    cache_peak_bytes: int = 0  # the most memory replay's kept outputs took (EngineConfig.cache_budget)


def activation_store(offload: str, device: torch.device, calib: torch.Tensor, hidden: int, dtype,
                     streams: int = 1) -> torch.device:
    """Where calibration activations live: the device when two copies of each stream (its inputs and
    outputs; two streams with ``dense_target``) take under half its free memory."""
    if offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if offload == "device":
        return device
    need = 2 * streams * calib.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


def replay_budget(store: torch.device) -> int:
    """Bytes :class:`prac.engine.replay.Replay` may keep: a quarter of the free memory of ``store``."""
    if store.type == "cuda":
        return int(0.25 * torch.cuda.mem_get_info(store)[0])
    try:
        return int(0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf: keep nothing
        return 0


class BlockEngine:
    """Runs the loop of the module docstring over a model's blocks."""

    def __init__(self, config: EngineConfig = EngineConfig(), device: torch.device | str = "cpu",
                 progress: Progress = no_progress, reduce: StatsReducer | None = None,
                 stats_factory: StatsFactory = InputStats, parallel: BlockParallel | None = None):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        self.reduce = reduce
        self.stats_factory = stats_factory
        self.parallel = parallel
        self._held: list[torch.Tensor] | None = None  # held-out flags per calibration batch (this run)
        # with dense_target: every group's dense inputs of the current block, per calibration batch
        self._dense: _DenseInputs | None = None
        self._calls: dict[str, int] | None = None  # calls per linear in one forward of the current block
        self._replay: Replay | None = None  # kept submodule outputs of the current block (sequential)
        self._first_batch = 0  # the global index of this process's first calibration batch
        self._finish_step: GroupStep | None = None
        self.cache_peak = 0  # the most bytes replay kept at once (a cache, not what the run needs)

    def run(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        spec: StatsSpec | None,
        step: GroupStep | None = None,
        ignore: str | None = None,
        return_hidden: bool = False,
        max_blocks: int | None = None,
        timer: PhaseTimer | None = None,
        finish_step: GroupStep | None = None,
    ) -> EngineOutcome:
        """Process the blocks of ``model`` from calibration token ids ``[n, seqlen]``.

        ``finish_step``: after a block's reconstruction, one more calibrated pass over the tuned block
        with this step (quantization on the final masks), its new weights applied like the first's.

        ``spec`` None: no statistics are needed — every linear is handed to ``step`` as a group of
        its own without a forward pass (magnitude pruning). ``max_blocks`` stops early (verification).
        """
        blocks = find_blocks(model)
        self._finish_step = finish_step
        outcome = EngineOutcome(blocks_path=blocks.path)
        timer = timer or PhaseTimer(self.device, outcome.phase_seconds)
        inputs: BlockInputs | None = None
        par = self.parallel
        held = holdout_rows(calib.shape[0], spec.holdout, spec.seed) if spec is not None else None
        if par is not None and (spec is not None or return_hidden):
            rows = par.share(calib.shape[0], calib.shape[1], self.config.batch_size)
            calib, held = calib[rows], (held[rows] if held is not None else None)
            self._first_batch = rows.start // self.config.batch_size
        self._held = list(held.split(self.config.batch_size)) if held is not None else None
        if spec is not None or return_hidden:
            hidden_size = model.get_input_embeddings().weight.shape[1]
            streams = 2 if self._dense_stream(spec, step) else 1
            store = activation_store(self.config.offload, self.device, calib, hidden_size,
                                     next(model.parameters()).dtype, streams)
            outcome.activation_device = str(store)
            with timer("capture"):
                inputs = capture_block_inputs(model, blocks, calib.split(self.config.batch_size), self.device, store)
        dense = None
        if self._dense_stream(spec, step):
            if self.config.dense_target and not spec.drift:
                raise RuntimeError("dense_target needs statistics with drift=True")
            dense = BlockInputs([h.clone() for h in inputs.hidden], inputs.args, inputs.kwargs)
        count = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
        last = count - 1
        zeros = entries = 0
        mover = BlockMover(blocks.modules, self.device, count=count)
        outcome.resident = mover.resident
        try:
            for i in self.progress(range(count), "blocks", count):
                zeros, entries = self._one_block(blocks, i, mover, inputs, dense, spec, step, ignore, timer, outcome,
                                                 i < last or return_hidden, zeros, entries)
                timer.flush(wait=False)  # CUDA: the phases the device has passed; nothing waits
        finally:
            with timer("transfer"):
                mover.finish()
        timer.flush()
        outcome.block_weights = (zeros, entries)
        outcome.cache_peak_bytes = self.cache_peak
        if return_hidden and inputs is not None:
            outcome.final_hidden = inputs.hidden
        return outcome

    def _one_block(self, blocks, i, mover, inputs, dense, spec, step, ignore, timer, outcome, propagate, zeros, entries):
        """Steps 1-7 of the module docstring for block ``i``; the updated weight-zero counts."""
        block = blocks.modules[i]
        with timer("transfer"):
            mover.fetch(i)  # the current stream waits for block i's copy (prefetched under block i - 1)
            mover.prefetch(i + 1)  # returns at once: block i + 1 is pinned and copied while block i is worked on
        with expert_views(block, blocks.name(i), ignore):  # removed before the block moves again
            units = block_units(block, blocks.name(i), ignore, i)
            self._block(block, units, inputs, dense, spec, step, timer)
            if dense is not None and self.config.reconstruct.active and units:
                outcome.replayed += self._end_replay()  # kept outputs are of the weights before tuning
                with timer("reconstruct"):
                    outcome.reconstruction.append(self._reconstruct(block, blocks.name(i), units, inputs, dense))
                if self._finish_step is not None:
                    self._finish(block, units, inputs, spec, timer)
            if inputs is not None and propagate:
                with timer("propagate"):
                    self._propagate(block, inputs)
            self._dense = None
            outcome.replayed += self._end_replay()
        log.info("block %d/%d (%s) done", i + 1, len(blocks), blocks.name(i))
        z, n = block_weight_counts(block)
        with timer("transfer"):
            mover.release(i)
        return zeros + z, entries + n

    def _finish(self, block, units: dict[str, Unit], inputs: BlockInputs, spec: StatsSpec, timer) -> None:
        """The finishing pass: statistics of the tuned block (H, no drift; the fit share's rows, the
        held-out sequences are never fitted) and ``finish_step`` on every group, its weights applied."""
        plain = StatsSpec(hessian=True, seed=spec.seed, holdout=spec.holdout)
        staged: dict[str, torch.Tensor] = {}
        self._calibrated_block(block, units, inputs, plain, self._finish_step, timer, staged,
                               self._grouping(block, units, inputs))
        if self.parallel is not None:
            staged = self.parallel.exchange(staged, units)
        for name, weight in staged.items():
            units[name].write(weight)
        self._end_replay()

    def _dense_stream(self, spec, step) -> bool:
        """Whether the dense model's stream runs beside the pruned one (dense target, reconstruction)."""
        return (self.config.dense_target or self.config.reconstruct.active) and spec is not None and step is not None

    def _reconstruct(self, block, name: str, units: dict[str, Unit], inputs: BlockInputs, dense: BlockInputs):
        """Tune the block's pruned linears to the dense stream's outputs of this block (:mod:`prac.engine.reconstruct`)."""
        par = self.parallel
        reduce = (lambda tensors: par.sum_tensors(tensors, f"reconstruction of {name}")) if par is not None else None
        tree = ((lambda nodes, template, what: par.sum_tree(nodes, template, f"{what} in reconstruction of {name}"))
                if par is not None else None)
        record = reconstruct_block(block, name, units, inputs, dense.hidden, self._held, self.config.reconstruct,
                                   self.device, sub_targets=self._dense.sublayers if self._dense else None,
                                   first_batch=self._first_batch, reduce=reduce, combine_tree=tree)
        self._dense = None
        log.info("%s reconstruction of %s: fit %.5f -> %.5f, held-out %s -> %s, %d steps, %s", record.mode, name,
                 record.fit_before, record.fit_after, record.heldout_before, record.heldout_after, record.steps,
                 "kept" if record.kept else "reverted")
        return record

    def _block(self, block, units: dict[str, Unit], inputs, dense, spec, step, timer) -> None:
        """Calibrate (or not), step and apply one block (expert views installed)."""
        par = self.parallel
        grouping = self._grouping(block, units, inputs) if spec is not None and units else None
        if dense is not None and grouping is not None:
            with timer("calibrate"):
                self._dense = self._dense_pass(block, units, dense, grouping)
        staged: dict[str, torch.Tensor] = {}
        if spec is None:
            if step is not None:
                with timer("prune"):
                    singles = [InputGroup([name], None, self.device) for name in units]
                    if par is not None:
                        par.assign(singles, units)
                    for group in singles:
                        if par is None or par.owns(group):
                            staged.update(step(group, units) or {})
        else:
            self._calibrated_block(block, units, inputs, spec, step, timer, staged, grouping)
        if par is not None and step is not None:
            with timer("exchange"):
                staged = par.exchange(staged, units)
        for name, weight in staged.items():
            units[name].write(weight)

    def _grouping(self, block, units: dict[str, Unit], inputs) -> tuple[list[list[str]], dict[str, int]]:
        """The block's input groups in forward order and how often each linear runs per forward (one probe)."""
        calls: dict[str, int] = {}
        modules = {name: unit.module for name, unit in units.items()}
        return group_by_input(block, modules, inputs, self.device, calls), calls

    def _chunks(self, names: list[list[str]], units: dict[str, Unit], sequential: bool) -> list[list[list[str]]]:
        """The groups calibrated by one forward each. Sequential: every group its own chunk, in forward
        order, except that the groups of one experts module's inputs (every expert's gate/up) form one
        chunk and its down projections another: experts do not read each other's outputs, so they are
        calibrated together, each on the block with the groups before it pruned. Else
        ``layer_batch_size`` groups per chunk (0: all)."""
        if not sequential:
            per_chunk = self.config.layer_batch_size or len(names)
            return [names[i:i + per_chunk] for i in range(0, len(names), per_chunk)]
        chunks: list[list[list[str]]] = []
        stage_chunk: dict[tuple[str, bool], list[list[str]]] = {}
        for group in names:
            where = units[group[0]].expert
            if where is None:
                chunks.append([group])
                continue
            stage = (where.experts, where.reads_block_input)
            if stage not in stage_chunk:
                stage_chunk[stage] = []
                chunks.append(stage_chunk[stage])
            stage_chunk[stage].append(group)
        return chunks

    def _calibrated_block(self, block, units, inputs, spec, step, timer, staged, grouping) -> None:
        if not units:
            return
        names, calls = grouping
        # A chunk's forward may stop at its last layer input when every linear runs once per forward.
        self._calls = calls if all(calls.get(n, 0) <= 1 for n in units) else None
        sequential = (self.config.sequential or self.config.dense_target) and step is not None
        store = inputs.hidden[0].device
        # kept outputs next to the compute (fetching them from the host would cost what they save)
        if sequential and self.config.replay and store.type == self.device.type:
            budget = replay_budget(store)
            if self.config.cache_budget is not None:
                budget = min(budget, int(self.config.cache_budget * 2**30))
            self._replay = Replay(block, [u.module for u in units.values()], store, budget)
        for chunk in self._chunks(names, units, sequential):
            with timer("calibrate"):
                groups = self._collect(block, chunk, units, inputs, spec)
                if self.parallel is not None:
                    self.parallel.assign(groups, units)
                    for group in groups:
                        self.parallel.reduce(group)
                for group in groups:  # the fixed-order sums of one process (a data-parallel reduce did it)
                    group.stats.finish()
                if self.reduce is not None:
                    for group in groups:
                        self.reduce(group)
                self._top_up_experts(block, groups, units, inputs, spec)
            for group in groups:
                if group.stats.count == 0:
                    log.warning("%s is never called in the block's forward: left dense", ", ".join(group.names))
                    continue
                group.stats.check_finite(group.names[0])
                if step is not None and (self.parallel is None or self.parallel.owns(group)):
                    with timer("prune"):
                        staged.update(step(group, units) or {})
                group.release()
            del groups
            if sequential:  # the next chunk is calibrated on this one's new weights
                if self.parallel is not None:
                    with timer("exchange"):
                        staged.update(self.parallel.exchange(staged, units))
                for name, weight in staged.items():
                    units[name].write(weight)
                staged.clear()
                if self._replay is not None:
                    self._replay.settle([units[n].module for names in chunk for n in names])

    def _collect(self, block, chunk, units: dict[str, Unit], inputs, spec) -> list[InputGroup]:
        """One forward over all calibration batches, with one accumulator per group in ``chunk``."""
        groups = [InputGroup(names, self._new_stats(units[names[0]].in_features, spec), self.device)
                  for names in chunk]
        batch = [None, 0]  # the held-out flags and the index of the batch being run, for the recorders
        called = [g.names[0] for g in groups if self._calls is not None and self._calls.get(g.names[0], 0) == 1]
        last = called[-1] if called else None  # the chunk's last input in forward order: stop there
        dense = self._dense if self.config.dense_target else None  # (reconstruction alone needs no drift)
        projections = {g.names[0]: self._drift_projection(g, units) for g in groups} if dense is not None else {}

        def sink_of(g: InputGroup):
            first = units[g.names[0]]
            if dense is None:
                def sink(x: torch.Tensor, route: Route | None) -> None:
                    g.stats.add_batch(x, held=batch[0], route=route)
            else:
                project = projections[g.names[0]]

                def sink(x: torch.Tensor, route: Route | None) -> None:
                    g.stats.add_batch(x, held=batch[0], route=route)
                    g.stats.add_drift(dense.input(first, batch[1], route).to(x.device), x, project, route, batch[0])
            hook = input_recorder(sink, routed=True)
            return stopping(hook) if g.names[0] == last else hook

        hooks = {units[g.names[0]].module: sink_of(g) for g in groups}
        replaying = self._replaying([units[n].module for names in chunk for n in names])
        with pre_hooks(hooks), replaying, torch.no_grad():
            for j in range(len(inputs)):
                batch[0], batch[1] = (self._held[j] if self._held is not None else None), j
                for g in groups:
                    g.stats.begin(self._first_batch + j)
                self._start_batch(j)
                run_block_until(block, inputs, j, self.device)
        return groups

    def _top_up_experts(self, block, groups: list[InputGroup], units: dict[str, Unit], inputs, spec) -> None:
        """Expert projections whose input got fewer tokens than ``expert_min_tokens`` get their
        statistics topped up with those of every calibration token of the block run through that
        expert (:meth:`prac.model.stats.InputStats.with_prior`): one more forward, stopped at the experts."""
        poor = []
        for g in groups:
            slot = units[g.names[0]].expert
            if slot is None:
                continue
            need = self.config.expert_min_tokens
            need = units[g.names[0]].in_features if need is None else need
            if g.stats.count == 0 or g.stats.count < need:
                poor.append((g, slot, need))
        if not poor:
            return
        # the fit share's rows alone, like the statistics they top up (the held-out ones are dropped)
        prior_spec = StatsSpec(hessian=spec.hessian, max_samples=spec.max_samples, seed=spec.seed, holdout=spec.holdout)
        priors: dict[tuple[str, int | None], InputStats] = {}  # every expert's gate/up reads the same tokens
        for g, slot, _ in poor:
            key = _prior_key(slot)
            if key not in priors:
                priors[key] = self._new_stats(units[g.names[0]].in_features, prior_spec)
        modules = {slot.experts: slot for _, slot, _ in poor}
        pending = [0]
        held: list[torch.Tensor | None] = [None]  # the held-out flags of the batch being run

        def hook_of(slot):
            wanted = [(e, stats) for (path, e), stats in priors.items() if path == slot.experts]

            def hook(_module, args):
                x = args[0]
                for e, stats in wanted:
                    if e is None:
                        stats.add_batch(x, held=held[0])
                    else:
                        stats.add_batch(expert_hidden(slot.module, slot.layout, slot.module._modules[str(e)], x),
                                        held=held[0])
                pending[0] -= 1
                if pending[0] == 0:
                    raise StopForward
            return hook

        hooks = {slot.module: hook_of(slot) for slot in modules.values()}
        with pre_hooks(hooks), self._replaying([], record=False), torch.no_grad():
            for j in range(len(inputs)):
                pending[0] = len(hooks)
                held[0] = self._held[j] if self._held is not None else None
                for stats in priors.values():
                    stats.begin(self._first_batch + j)
                self._start_batch(j)
                run_block_until(block, inputs, j, self.device)
        for (path, e), stats in priors.items():
            if self.parallel is not None:
                self.parallel.reduce_all(stats, f"prior of {path}" + ("" if e is None else f".{e}"))
            stats.finish()
        scale = self._route_scale(groups, units)
        for g, slot, need in poor:
            prior = priors[_prior_key(slot)]
            # an expert without a token: the block's tokens alone, at their own count
            g.stats = g.stats.with_prior(prior, scale.get(slot.experts, 1.0), need if g.stats.count else prior.count)
            log.info("%s: %d routed tokens, topped up with %d of the block's (min %d)", ", ".join(g.names),
                     g.stats.count - g.stats.prior_tokens, g.stats.prior_tokens, need)

    @staticmethod
    def _route_scale(groups: list[InputGroup], units: dict[str, Unit]) -> dict[str, float]:
        """Mean r² of the routed rows of each experts module (over the groups of this chunk)."""
        sums: dict[str, list[float]] = {}
        for g in groups:
            unit = units[g.names[0]]
            if unit.expert is not None:
                acc = sums.setdefault(unit.expert.experts, [0.0, 0])
                acc[0] += float(g.stats.route_sq)
                acc[1] += g.stats.count - g.stats.prior_tokens
        return {path: (s / n if n else 1.0) for path, (s, n) in sums.items()}

    def _drift_projection(self, group: InputGroup, units: dict[str, Unit]) -> dict[str, torch.Tensor] | None:
        """The dense weights of a group whose linears have fewer outputs in all than inputs (down_proj):
        its drift is then kept as W₀ D per linear, out × in instead of in × in per token."""
        outs = {n: units[n].out_features for n in group.names}
        if sum(outs.values()) >= group.stats.dim:
            return None
        group.stats.drift_per_linear(outs)
        return {n: units[n].read().to(self.device) for n in group.names}

    def _replaying(self, recorded: list[nn.Module], record: bool = True):
        return self._replay.forwards(recorded, record) if self._replay is not None else contextlib.nullcontext()

    def _start_batch(self, index: int) -> None:
        if self._replay is not None:
            self._replay.start_batch(index)

    def _end_replay(self) -> int:
        """Drop the block's kept outputs; how many calls they answered."""
        if self._replay is None:
            return 0
        hits = self._replay.hits
        self.cache_peak = max(self.cache_peak, self._replay.peak)
        log.info("replay: %d submodule calls reused, %.1f MiB kept", hits, self._replay.nbytes / 2**20)
        self._replay.clear()
        self._replay = None
        return hits

    def _dense_pass(self, block, units: dict[str, Unit], dense: BlockInputs, grouping) -> _DenseInputs:
        """The dense stream through the (still dense) block: every group's input per batch, kept on the
        activations' device, and the block's outputs as the stream's next inputs. For MoE experts the
        experts module's input (every token) is kept instead, with the experts' dense gate/up weights:
        the tokens an expert gets in the pruned model are not those the dense model routes to it, so
        its dense inputs are computed for the tokens it gets here (:meth:`_DenseInputs.input`)."""
        names, calls = grouping
        firsts = [group[0] for group in names]
        repeated = [n for n in units if calls.get(n, 0) > 1]
        if repeated:
            raise PracError(f"--dense-target needs every linear to run once per block forward; {repeated[0]} runs "
                            f"{calls[repeated[0]]} times (use --no-dense-target)")
        keep_inputs = self.config.dense_target
        plain = [n for n in firsts if units[n].expert is None] if keep_inputs else []
        slots = ({units[n].expert.experts: units[n].expert for n in firsts if units[n].expert is not None}
                 if keep_inputs else {})
        cached = _DenseInputs({name: [] for name in plain}, slots, self.device)
        store = dense.hidden[0].device
        if store.type == "cuda":  # every group's inputs at once: on the device only when they fit easily
            tokens = sum(h.shape[0] * h.shape[1] for h in dense.hidden)
            width = sum(units[n].in_features for n in plain) + dense.hidden[0].shape[-1] * len(slots)
            need = tokens * width * dense.hidden[0].element_size()
            if need > 0.5 * torch.cuda.mem_get_info(store)[0]:
                store = torch.device("cpu")
        hooks = {units[n].module: input_recorder(lambda x, _n=n: cached.plain[_n].append(x.detach().to(store)))
                 for n in plain}
        hooks.update({slot.module: input_recorder(lambda x, _p=path: cached.moe[_p].append(x.detach().to(store)))
                      for path, slot in slots.items()})
        taps = []
        if self.config.reconstruct.mode == "sublayer":  # the dense sublayers' outputs: their targets
            names = {id(m): n for n, m in block.named_modules()}
            heads = sublayers_of(block, [names[id(u.module)] for u in units.values()])
            cached.sublayers = {h: [] for h in heads}
            for h in heads:
                taps.append(block.get_submodule(h).register_forward_hook(
                    lambda _m, _a, out, _h=h: cached.sublayers[_h].append(block_output(out).detach().to(store))))
        try:
            with pre_hooks(hooks), torch.no_grad():
                for j in range(len(dense)):
                    dense.hidden[j] = run_block(block, dense, j, self.device).to(dense.hidden[j].device)
        finally:
            for t in taps:
                t.remove()
        return cached

    def _new_stats(self, dim: int, spec: StatsSpec) -> InputStats:
        stats = self.stats_factory(dim, self.device, spec)
        return stats if self.parallel is None else self.parallel.new_stats(stats)

    def _propagate(self, block: nn.Module, inputs: BlockInputs) -> None:
        with self._replaying([], record=False), torch.no_grad():
            for j in range(len(inputs)):
                self._start_batch(j)
                store = inputs.hidden[j].device
                inputs.hidden[j] = run_block(block, inputs, j, self.device).to(store)


def calibrate(model: nn.Module, calib: torch.Tensor, spec: StatsSpec, observe: Callable[[InputGroup], None],
              config: EngineConfig = EngineConfig(), device: torch.device | str = "cpu", ignore: str | None = None,
              progress: Progress = no_progress, max_blocks: int | None = None,
              stats_factory: StatsFactory = InputStats) -> EngineOutcome:
    """A calibrate-only pass: every input group's statistics of the *dense* model, handed to ``observe``.

    Nothing is pruned; each block sees the dense outputs of the blocks before it (a dense scan, as
    sparsity allocators and verification need).
    """
    engine = BlockEngine(dataclasses.replace(config, sequential=False, dense_target=False, reconstruct=ReconstructConfig()),
                         device, progress, stats_factory=stats_factory)

    def step(group: InputGroup, _units) -> None:
        observe(group)

    return engine.run(model, calib, spec, step, ignore=ignore, max_blocks=max_blocks)


def check_pattern_fits(model: nn.Module, check: Callable[[str, Unit], None], ignore: str | None = None) -> Blocks:
    """Before any work: every weight matrix of the blocks is one prac prunes, leaves to the user's
    ``--ignore`` or knows to be a router (:func:`prac.model.units.check_block_parameters`), and
    ``check(name, unit)`` passes for every prunable unit, expert projections included."""
    blocks = check_block_parameters(model, ignore)
    for _blocks, _i, units in model_units(model, ignore):
        for name, unit in units.items():
            check(name, unit)
    return blocks


def _prior_key(slot) -> tuple[str, int | None]:
    """The prior an expert projection is topped up with: its experts module's input for gate/up (the
    same for every expert), its own hidden state over every token for down."""
    return slot.experts, (None if slot.reads_block_input else slot.index)


class _DenseInputs:
    """A block's inputs in the dense stream, per calibration batch: ``plain`` per group (its first
    linear's name), ``moe`` per experts module (its input, every token, with the experts' dense gate/up
    weights kept before any is pruned). :meth:`input` gives a unit's dense input for a batch, for an
    expert on the tokens of its route."""

    def __init__(self, plain: dict[str, list[torch.Tensor]], slots: dict, device: torch.device):
        self.plain, self.slots, self.device = plain, slots, device
        self.sublayers: dict[str, list[torch.Tensor]] | None = None  # dense sublayer outputs (reconstruction)
        self.moe: dict[str, list[torch.Tensor]] = {path: [] for path in slots}
        self._weights = {path: dense_gate_weights(slot.module, slot.layout) for path, slot in slots.items()}

    def input(self, unit: Unit, batch: int, route: Route | None) -> torch.Tensor:
        slot = unit.expert
        if slot is None:
            return self.plain[unit.name][batch]
        kept = self.moe[slot.experts][batch]
        x = kept[route.tokens.to(kept.device)].to(self.device)
        if slot.reads_block_input:
            return x
        parts = [torch.nn.functional.linear(x, w, b) for w, b in self._weights[slot.experts][slot.index]]
        return gated(slot.module, slot.layout, parts)
