"""What the block engine (:mod:`prac.engine.loop`) holds while it runs: a :class:`RunState` for the
run, carried from block to block, and a :class:`BlockState` for the block it works on, made fresh for
every block (so nothing of one block is left for the next).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from prac.core.timing import PhaseTimer
from prac.engine.config import EngineOutcome, GroupStep
from prac.engine.dense_target import DenseInputs
from prac.engine.replay import Replay
from prac.engine.residency import BlockMover
from prac.model.blocks import BlockInputs, Blocks
from prac.model.stats import StatsSpec
from prac.model.units import Unit


@dataclass
class BlockState:
    """What the engine holds for the block it works on (expert views installed); made fresh for every block."""

    block: nn.Module
    name: str
    units: dict[str, Unit]
    dense_inputs: DenseInputs | None = None  # the block's inputs in the dense stream (dense target, reconstruction)
    calls: dict[str, int] | None = None  # calls per linear in one forward, when none runs more than once
    replay: Replay | None = None  # kept submodule outputs (a sequential calibration, EngineConfig.replay)

    def replaying(self, recorded: list[nn.Module], record: bool = True):
        return self.replay.forwards(recorded, record) if self.replay is not None else contextlib.nullcontext()

    def start_batch(self, index: int) -> None:
        if self.replay is not None:
            self.replay.start_batch(index)


@dataclass
class RunState:
    """What one :meth:`prac.engine.loop.BlockEngine.run` carries from block to block."""

    blocks: Blocks
    mover: BlockMover
    spec: StatsSpec | None
    step: GroupStep | None
    finish_step: GroupStep | None
    ignore: str | None
    timer: PhaseTimer
    outcome: EngineOutcome
    inputs: BlockInputs | None  # the model's stream of hidden states, per calibration batch
    dense: BlockInputs | None  # the dense model's stream beside it (dense target, reconstruction)
    held: list[torch.Tensor] | None  # held-out flags per calibration batch of this process
    first_batch: int  # the global index of this process's first calibration batch
    zeros: int = 0  # weight zeros and entries of the processed blocks
    entries: int = 0

    def held_flags(self, j: int) -> torch.Tensor | None:
        return self.held[j] if self.held is not None else None
