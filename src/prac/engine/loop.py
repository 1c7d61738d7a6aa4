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
(``prac.engine.pipeline.dense_target_weight``) instead of the current inputs' one. The dense stream's
pass is :mod:`prac.engine.dense_target`; MoE experts that got few tokens are topped up after step 3
(:mod:`prac.engine.moe`).

Block k is thus calibrated on the outputs of the already processed blocks 0..k-1. A step of
``None`` is a dense scan: statistics of the unpruned model, block after block. Calibration
activations stay on the device when they fit, else on the CPU (:mod:`prac.engine.memory`).

What the loop holds for one run is a :class:`prac.engine.state.RunState`, for the block it works on a
:class:`prac.engine.state.BlockState` (made fresh for every block).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseTimer
from prac.engine.config import (  # the engine's interface; imported from here too
    BlockParallel,
    EngineConfig,
    EngineOutcome,
    GroupStep,
    StatsFactory,
    StatsReducer,
)
from prac.engine.dense_target import dense_pass, drift_projection
from prac.engine.memory import activation_store, replay_budget
from prac.engine.moe import expert_top_up
from prac.engine.reconstruct import ReconstructConfig, reconstruct_block
from prac.engine.replay import Replay
from prac.engine.residency import BlockMover
from prac.engine.state import BlockState, RunState
from prac.model.blocks import (
    BlockInputs,
    Blocks,
    capture_block_inputs,
    find_blocks,
    group_by_input,
    input_recorder,
    pre_hooks,
    run_block,
    run_block_until,
    stopping,
)
from prac.model.experts import Route, expert_views
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec
from prac.model.units import Unit, block_units, block_weight_counts, check_block_parameters, model_units

log = logging.getLogger(__name__)


class BlockEngine:
    """Runs the loop of the module docstring over a model's blocks."""

    def __init__(self, config: EngineConfig = EngineConfig(), device: torch.device | str = "cpu",  # noqa: B008 (frozen)
                 progress: Progress = no_progress, reduce: StatsReducer | None = None,
                 stats_factory: StatsFactory = InputStats, parallel: BlockParallel | None = None):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        self.reduce = reduce
        self.stats_factory = stats_factory
        self.parallel = parallel
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
        outcome = EngineOutcome(blocks_path=blocks.path)
        timer = timer or PhaseTimer(self.device, outcome.phase_seconds)
        inputs: BlockInputs | None = None
        par = self.parallel
        first_batch = 0
        held = spec.held_rows(calib.shape[0]) if spec is not None else None
        if par is not None and (spec is not None or return_hidden):
            rows = par.share(calib.shape[0], calib.shape[1], self.config.batch_size)
            calib, held = calib[rows], (held[rows] if held is not None else None)
            first_batch = rows.start // self.config.batch_size
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
        mover = BlockMover(blocks.modules, self.device, count=count)
        outcome.resident = mover.resident
        run = RunState(blocks, mover, spec, step, finish_step, ignore, timer, outcome, inputs, dense,
                       list(held.split(self.config.batch_size)) if held is not None else None, first_batch)
        try:
            for i in self.progress(range(count), "blocks", count):
                self._one_block(run, i, propagate=i < count - 1 or return_hidden)
                timer.flush(wait=False)  # CUDA: the phases the device has passed; nothing waits
        finally:
            with timer("transfer"):
                mover.finish()
        timer.flush()
        outcome.block_weights = (run.zeros, run.entries)
        outcome.cache_peak_bytes = self.cache_peak
        if return_hidden and inputs is not None:
            outcome.final_hidden = inputs.hidden
        return outcome

    def _one_block(self, run: RunState, i: int, propagate: bool) -> None:
        """Steps 1-7 of the module docstring for block ``i``; its weight zeros and entries added to the run's."""
        block, name, timer, outcome = run.blocks.modules[i], run.blocks.name(i), run.timer, run.outcome
        with timer("transfer"):
            run.mover.fetch(i)  # the current stream waits for block i's copy (prefetched under block i - 1)
            run.mover.prefetch(i + 1)  # returns at once: block i + 1 is pinned and copied while block i is worked on
        with expert_views(block, name, run.ignore):  # removed before the block moves again
            state = BlockState(block, name, block_units(block, name, run.ignore, i))
            self._block(run, state)
            if run.dense is not None and self.config.reconstruct.active and state.units:
                outcome.replayed += self._end_replay(state)  # kept outputs are of the weights before tuning
                with timer("reconstruct"):
                    outcome.reconstruction.append(self._reconstruct(run, state))
                state.dense_inputs = None  # spent: freed before the finishing pass
                if run.finish_step is not None:
                    self._finish(run, state)
            if run.inputs is not None and propagate:
                with timer("propagate"):
                    self._propagate(run, state)
            outcome.replayed += self._end_replay(state)
            del state  # the block's dense inputs go before the block moves
        log.info("block %d/%d (%s) done", i + 1, len(run.blocks), name)
        z, n = block_weight_counts(block)
        run.zeros, run.entries = run.zeros + z, run.entries + n
        with timer("transfer"):
            run.mover.release(i)

    def _finish(self, run: RunState, state: BlockState) -> None:
        """The finishing pass: statistics of the tuned block (H, no drift; the fit share's rows, the
        held-out sequences are never fitted) and ``finish_step`` on every group, its weights applied."""
        plain = StatsSpec(hessian=True, seed=run.spec.seed, holdout=run.spec.holdout, held=run.spec.held)
        staged: dict[str, torch.Tensor] = {}
        self._calibrated_block(run, state, plain, run.finish_step, staged, self._grouping(state, run.inputs))
        if self.parallel is not None:
            staged = self.parallel.exchange(staged, state.units)
        for name, weight in staged.items():
            state.units[name].write(weight)
        self._end_replay(state)

    def _dense_stream(self, spec, step) -> bool:
        """Whether the dense model's stream runs beside the pruned one (dense target, reconstruction)."""
        return (self.config.dense_target or self.config.reconstruct.active) and spec is not None and step is not None

    def _reconstruct(self, run: RunState, state: BlockState):
        """Tune the block's pruned linears to the dense stream's outputs of this block (:mod:`prac.engine.reconstruct`)."""
        par, name = self.parallel, state.name
        reduce = (lambda tensors: par.sum_tensors(tensors, f"reconstruction of {name}")) if par is not None else None
        tree = ((lambda nodes, template, what: par.sum_tree(nodes, template, f"{what} in reconstruction of {name}"))
                if par is not None else None)
        sub_targets = state.dense_inputs.sublayers if state.dense_inputs is not None else None
        record = reconstruct_block(state.block, name, state.units, run.inputs, run.dense.hidden, run.held,
                                   self.config.reconstruct, self.device, sub_targets=sub_targets,
                                   first_batch=run.first_batch, reduce=reduce, combine_tree=tree)
        log.info("%s reconstruction of %s: fit %.5f -> %.5f, held-out %s -> %s, %d steps, %s", record.mode, name,
                 record.fit_before, record.fit_after, record.heldout_before, record.heldout_after, record.steps,
                 "kept" if record.kept else "reverted")
        return record

    def _block(self, run: RunState, state: BlockState) -> None:
        """Calibrate (or not), step and apply one block."""
        par, units, spec, step = self.parallel, state.units, run.spec, run.step
        grouping = self._grouping(state, run.inputs) if spec is not None and units else None
        if run.dense is not None and grouping is not None:
            with run.timer("calibrate"):
                state.dense_inputs = dense_pass(state.block, units, run.dense, grouping, self.device,
                                                self.config.dense_target, self.config.reconstruct.mode == "sublayer")
        staged: dict[str, torch.Tensor] = {}
        if spec is None:
            if step is not None:
                with run.timer("prune"):
                    singles = [InputGroup([name], None, self.device) for name in units]
                    if par is not None:
                        par.assign(singles, units)
                    for group in singles:
                        if par is None or par.owns(group):
                            staged.update(step(group, units) or {})
        else:
            self._calibrated_block(run, state, spec, step, staged, grouping)
        if par is not None and step is not None:
            with run.timer("exchange"):
                staged = par.exchange(staged, units)
        for name, weight in staged.items():
            units[name].write(weight)

    def _grouping(self, state: BlockState, inputs) -> tuple[list[list[str]], dict[str, int]]:
        """The block's input groups in forward order and how often each linear runs per forward (one probe)."""
        calls: dict[str, int] = {}
        modules = {name: unit.module for name, unit in state.units.items()}
        return group_by_input(state.block, modules, inputs, self.device, calls), calls

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

    def _calibrated_block(self, run: RunState, state: BlockState, spec: StatsSpec, step: GroupStep | None,
                          staged: dict[str, torch.Tensor], grouping) -> None:
        units = state.units
        if not units:
            return
        names, calls = grouping
        # A chunk's forward may stop at its last layer input when every linear runs once per forward.
        state.calls = calls if all(calls.get(n, 0) <= 1 for n in units) else None
        sequential = (self.config.sequential or self.config.dense_target) and step is not None
        store = run.inputs.hidden[0].device
        # kept outputs next to the compute (fetching them from the host would cost what they save)
        if sequential and self.config.replay and store.type == self.device.type:
            budget = replay_budget(store)
            if self.config.cache_budget is not None:
                budget = min(budget, int(self.config.cache_budget * 2**30))
            state.replay = Replay(state.block, [u.module for u in units.values()], store, budget)
        for chunk in self._chunks(names, units, sequential):
            with run.timer("calibrate"):
                groups = self._collect(run, state, chunk, spec)
                if self.parallel is not None:
                    self.parallel.assign(groups, units)
                    for group in groups:
                        self.parallel.reduce(group)
                for group in groups:  # the fixed-order sums of one process (a data-parallel reduce did it)
                    group.stats.finish()
                if self.reduce is not None:
                    for group in groups:
                        self.reduce(group)
                self._top_up(run, state, groups, spec)
            for group in groups:
                if group.stats.count == 0:
                    log.warning("%s is never called in the block's forward: left dense", ", ".join(group.names))
                    continue
                group.stats.check_finite(group.names[0])
                if step is not None and (self.parallel is None or self.parallel.owns(group)):
                    with run.timer("prune"):
                        staged.update(step(group, units) or {})
                group.release()
            del groups
            if sequential:  # the next chunk is calibrated on this one's new weights
                if self.parallel is not None:
                    with run.timer("exchange"):
                        staged.update(self.parallel.exchange(staged, units))
                for name, weight in staged.items():
                    units[name].write(weight)
                staged.clear()
                if state.replay is not None:
                    state.replay.settle([units[n].module for names in chunk for n in names])

    def _collect(self, run: RunState, state: BlockState, chunk, spec: StatsSpec) -> list[InputGroup]:
        """One forward over all calibration batches, with one accumulator per group in ``chunk``."""
        units = state.units
        groups = [InputGroup(names, self._new_stats(units[names[0]].in_features, spec), self.device)
                  for names in chunk]
        batch = [None, 0]  # the held-out flags and the index of the batch being run, for the recorders
        called = [g.names[0] for g in groups if state.calls is not None and state.calls.get(g.names[0], 0) == 1]
        last = called[-1] if called else None  # the chunk's last input in forward order: stop there
        dense = state.dense_inputs if self.config.dense_target else None  # (reconstruction alone needs no drift)
        projections = {g.names[0]: drift_projection(g, units, self.device) for g in groups} if dense is not None else {}

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

        def before(j: int) -> None:
            batch[0], batch[1] = run.held_flags(j), j
            for g in groups:
                g.stats.begin(run.first_batch + j)

        hooks = {units[g.names[0]].module: sink_of(g) for g in groups}
        self._forwards(run, state, hooks, before, [units[n].module for names in chunk for n in names])
        return groups

    def _top_up(self, run: RunState, state: BlockState, groups: list[InputGroup], spec: StatsSpec) -> None:
        """Expert projections that got too few tokens topped up (:mod:`prac.engine.moe`): one more
        forward, stopped at the experts."""
        top_up = expert_top_up(groups, state.units, spec, self.config.expert_min_tokens, self._new_stats)
        if top_up is None:
            return
        begin = lambda j: top_up.begin(run.first_batch + j, run.held_flags(j))
        self._forwards(run, state, top_up.hooks, begin, [], record=False)
        top_up.apply(groups, state.units, self.parallel)

    def _forwards(self, run: RunState, state: BlockState, hooks: dict, before: Callable[[int], None],
                  recorded: list[nn.Module], record: bool = True) -> None:
        """One forward of the block over every calibration batch with the pre-hooks ``hooks`` (one may
        stop it), ``before(j)`` called before batch ``j``; replay records unless ``record`` is False."""
        with pre_hooks(hooks), state.replaying(recorded, record), torch.no_grad():
            for j in range(len(run.inputs)):
                before(j)
                state.start_batch(j)
                run_block_until(state.block, run.inputs, j, self.device)

    def _end_replay(self, state: BlockState) -> int:
        """Drop the block's kept outputs; how many calls they answered."""
        if state.replay is None:
            return 0
        hits = state.replay.hits
        self.cache_peak = max(self.cache_peak, state.replay.peak)
        log.info("replay: %d submodule calls reused, %.1f MiB kept", hits, state.replay.nbytes / 2**20)
        state.replay.clear()
        state.replay = None
        return hits

    def _new_stats(self, dim: int, spec: StatsSpec) -> InputStats:
        stats = self.stats_factory(dim, self.device, spec)
        return stats if self.parallel is None else self.parallel.new_stats(stats)

    def _propagate(self, run: RunState, state: BlockState) -> None:
        inputs = run.inputs
        with state.replaying([], record=False), torch.no_grad():
            for j in range(len(inputs)):
                state.start_batch(j)
                store = inputs.hidden[j].device
                inputs.hidden[j] = run_block(state.block, inputs, j, self.device).to(store)


def calibrate(model: nn.Module, calib: torch.Tensor, spec: StatsSpec, observe: Callable[[InputGroup], None],
              config: EngineConfig = EngineConfig(), device: torch.device | str = "cpu",  # noqa: B008 (frozen)
              ignore: str | None = None, progress: Progress = no_progress, max_blocks: int | None = None,
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
