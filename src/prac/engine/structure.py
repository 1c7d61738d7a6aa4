"""The structured pass: remove MLP neurons and KV groups of attention heads block by block, each block's
consumer linear (``mlp.down_proj``, ``self_attn.o_proj``) refitted on the channels it keeps.

It runs on the block engine like any pruning run: block ``i`` is calibrated on the outputs of the
already shrunk blocks ``0..i-1``; the step (:class:`StructureStep`) sees the input group of each
consumer, chooses the kept channels with :func:`prac.methods.structured.select_channels` (the error
after the exact refit, greedy in groups) and hands back the consumer with exact zeros on the removed
columns, so the block propagates exactly what the sliced block will. After the run the zeroed channels
are sliced out of the weights and the config (:mod:`prac.model.shrink`): every block keeps the same
shape. ``sequential``: the MLP's statistics are taken with the block's attention already shrunk.

Whole blocks go first (``num_hidden_layers``, :mod:`prac.engine.depth`), chosen on the dense model by
the measured change of the held-out output; the widths are then chosen on the blocks that remain.

Held out: ``holdout`` of the calibration sequences (the draw of :func:`prac.model.stats.holdout_rows`)
enter no statistic the selection is fitted on; they judge which blocks go, and the tuning.

Repair: with the engine's ``dense_target`` each consumer is first moved to the weight that best gives
the dense model's output from the shrunk model's inputs (:func:`prac.engine.pipeline.dense_target_weight`),
then selected; with ``reconstruct`` every linear of the block (its kept channels: the removed ones are
exact zeros, or meet one) is tuned to the dense model's block output, as for a sparse model
(:mod:`prac.engine.reconstruct`), before the block's output is passed on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prac.core.progress import Progress, no_progress
from prac.core.timing import PhaseTimer
from prac.engine.config import BlockParallel, EngineConfig
from prac.engine.depth import DepthRecord, choose_blocks_to_drop
from prac.engine.loop import BlockEngine
from prac.engine.pipeline import dense_target_weight
from prac.engine.structure_search import SEARCH_SEQUENCES, SearchOutcome, search_shape
from prac.methods.structured import DAMPING, select_channels
from prac.model.group import InputGroup
from prac.model.shrink import (
    Shape,
    block_parameters,
    config_diff,
    drop_layers,
    head_dim,
    shrink_attention,
    shrink_mlp,
    text_config,
)
from prac.model.stats import StatsSpec, holdout_rows
from prac.model.units import Unit

MLP_CONSUMER = "mlp.down_proj"
ATTENTION_CONSUMER = "self_attn.o_proj"


@dataclass
class StructureRecord:
    """One consumer's selection: block index, what (``mlp``/``attention``), channel groups kept of
    how many, the relative output error after the refit, greedy rounds, seconds."""

    block: int
    part: str
    kept: list[int]
    of: int
    relative_error: float
    rounds: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "part": self.part, "kept": len(self.kept), "of": self.of,
                "kept_indices": self.kept, "relative_error": self.relative_error, "rounds": self.rounds,
                "seconds": round(self.seconds, 4)}


class StructureStep:
    """The engine's step for the structured pass (see the module docstring)."""

    def __init__(self, shape: Shape, heads_per_group: int, dim: int, damping: float = DAMPING,
                 dense_target: bool = False, dense_target_damping: float = 1e-2):
        self.shape, self.heads_per_group, self.dim, self.damping = shape, heads_per_group, dim, damping
        self.dense_target, self.dense_target_damping = dense_target, dense_target_damping
        self.records: list[StructureRecord] = []

    def __call__(self, group: InputGroup, units: dict[str, Unit]) -> dict[str, torch.Tensor]:
        staged: dict[str, torch.Tensor] = {}
        for name in group.names:
            part, keep, width = self._part(name)
            if part is None:
                continue
            started = time.perf_counter()
            unit = units[name]
            weight = unit.read()
            source = (dense_target_weight(weight, group, self.dense_target_damping, name) if self.dense_target
                      else weight)
            chosen = select_channels(source, group.hessian(), keep, width=width, damping=self.damping)
            staged[name] = chosen.weight.to(weight.dtype)
            block = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else len(self.records)
            self.records.append(StructureRecord(block, part, chosen.kept.tolist(), chosen.info["groups"],
                                                chosen.relative_error, chosen.rounds, time.perf_counter() - started))
        return staged

    def _part(self, name: str) -> tuple[str | None, int, int]:
        if name.endswith(MLP_CONSUMER) and self.shape.intermediate_size is not None:
            return "mlp", self.shape.intermediate_size, 1
        if name.endswith(ATTENTION_CONSUMER) and self.shape.num_key_value_heads is not None:
            return "attention", self.shape.num_key_value_heads, self.heads_per_group * self.dim
        return None, 0, 0


@dataclass
class StructureOutcome:
    """What the structured pass did: the records, the blocks dropped (one record per greedy round),
    parameters of the blocks before and after, the config fields changed, seconds, the tuning's records
    (:class:`prac.engine.reconstruct.ReconstructRecord`, with ``reconstruct``) and the engine's
    phase seconds."""

    records: list[StructureRecord] = field(default_factory=list)
    depth: list[DepthRecord] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    reconstruction: list = field(default_factory=list)
    search: SearchOutcome | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    config_changes: dict[str, list[Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "kept_share": self.parameters_after / self.parameters_before if self.parameters_before else None,
                "config_changes": self.config_changes, "seconds": round(self.seconds, 3),
                **({"dropped_blocks": self.dropped, "depth_rounds": [r.to_dict() for r in self.depth]}
                   if self.depth else {}),
                **({"search": self.search.to_dict()} if self.search else {}),
                "blocks": [r.to_dict() for r in self.records]}


def shrink_model(model: nn.Module, calib: torch.Tensor, shape: Shape, engine: EngineConfig, device: torch.device,
                 progress: Progress = no_progress, damping: float = DAMPING, holdout: float = 0.0, seed: int = 0,
                 ignore: str | None = None, width_multiple: int = 1,
                 dense_target_damping: float = 1e-2, held: torch.Tensor | None = None,
                 parallel: BlockParallel | None = None) -> StructureOutcome:
    """Shrink ``model`` in place to ``shape`` (blocks, then MLP neurons and KV groups; see the module
    docstring), calibrated on token ids ``[n, seqlen]``; its config is updated to match. ``holdout``:
    the share of sequences held out (``seed`` draws them); ``ignore``: linears the tuning leaves alone;
    ``width_multiple``: what ``--target-params``' widths must be a multiple of (a quantization group);
    ``dense_target_damping``: the ridge of the dense target (``--dense-target-damping``); ``held``: the
    held-out sequences given explicitly (bool ``[n]``) instead of drawn; ``parallel``: a data-parallel
    run's hooks — the widths' statistics, selection and tuning are spread over the processes as in any
    run (the same weights, bit for bit); the blocks to drop and the search's candidates are computed
    whole on every process (the same on each: they read every sequence)."""
    started = time.perf_counter()
    cfg = text_config(model.config)
    before_cfg = cfg.to_dict()
    outcome = StructureOutcome(parameters_before=block_parameters(model))
    damping = shape.damping if shape.damping is not None else damping  # --structure-damping
    if shape.target_params is not None:
        outcome.search = search_shape(model, calib, shape.target_params, engine, device, holdout, seed, progress,
                                      width_multiple, fixed=shape,
                                      max_fitted=shape.search_nsamples or SEARCH_SEQUENCES, damping=damping)
        shape = outcome.search.chosen
    if held is None:
        held = holdout_rows(calib.shape[0], holdout, seed)
    elif not bool(held.any()):
        held = None
    if shape.num_hidden_layers is not None and shape.num_hidden_layers < int(cfg.num_hidden_layers):
        judge = calib if held is None else calib[held]
        outcome.dropped, outcome.depth = choose_blocks_to_drop(model, judge, int(cfg.num_hidden_layers)
                                                                - shape.num_hidden_layers, engine.batch_size, device)
        drop_layers(model, [i for i in range(int(cfg.num_hidden_layers)) if i not in outcome.dropped])
    kv = int(cfg.num_key_value_heads)
    step = StructureStep(shape, int(cfg.num_attention_heads) // kv, head_dim(cfg), damping, engine.dense_target,
                         dense_target_damping)
    if shape.intermediate_size is not None or shape.num_key_value_heads is not None:
        tuned = engine.reconstruct.active
        run_cfg = engine if tuned or engine.dense_target else dataclasses.replace(engine, dense_target=False)
        spec = StatsSpec(hessian=True, seed=seed, holdout=holdout if held is not None else 0.0,
                         drift=engine.dense_target,
                         held=tuple(held.tolist()) if held is not None else None)
        run = BlockEngine(run_cfg, device, progress, parallel=parallel).run(model, calib, spec, step,
                                                         ignore=ignore if tuned else _only(shape),
                                                         timer=PhaseTimer(device, outcome.phase_seconds))
        outcome.reconstruction = run.reconstruction
        if parallel is not None:  # each record was made by its group's owner: every process needs them all
            step.records = sorted(parallel.gather(step.records, "structure records"),
                                  key=lambda r: (r.block, r.part != "attention"))
        _slice(model, step, shape)
    outcome.records = step.records
    outcome.parameters_after = block_parameters(model)
    outcome.config_changes = config_diff(before_cfg, cfg.to_dict())
    outcome.seconds = time.perf_counter() - started
    return outcome


def _only(shape: Shape) -> str:
    """The ``ignore`` regex that leaves the engine only the consumers this shape changes."""
    wanted = [c for c, on in ((MLP_CONSUMER, shape.intermediate_size), (ATTENTION_CONSUMER, shape.num_key_value_heads))
              if on is not None]
    return r"^(?!.*(" + "|".join(w.replace(".", r"\.") + "$" for w in wanted) + r")).*"


def _slice(model: nn.Module, step: StructureStep, shape: Shape) -> None:
    """Slice every block to the kept channels of its records, and set the config's fields."""
    cfg = text_config(model.config)
    layers = model.get_decoder().layers
    for record in step.records:
        block = layers[record.block]
        kept = torch.tensor(record.kept)
        if record.part == "mlp":
            shrink_mlp(block.mlp, kept)
        else:
            shrink_attention(block.self_attn, kept, step.heads_per_group, step.dim)
    if shape.intermediate_size is not None:
        cfg.intermediate_size = shape.intermediate_size
    if shape.num_key_value_heads is not None:
        cfg.head_dim = step.dim  # explicit: hidden_size // heads no longer gives it
        cfg.num_attention_heads = shape.num_key_value_heads * step.heads_per_group
        cfg.num_key_value_heads = shape.num_key_value_heads
