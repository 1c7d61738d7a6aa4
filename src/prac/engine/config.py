"""What the block engine (:mod:`prac.engine.loop`) is given and hands back: its configuration
(:class:`EngineConfig`), the caller's hooks — the step run on every input group (:data:`GroupStep`),
the statistics' reducer and factory, the data-parallel hooks (:class:`BlockParallel`) — and what a run
gives back (:class:`EngineOutcome`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from prac.core.errors import PracError
from prac.engine.reconstruct import ReconstructConfig
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec
from prac.model.units import Unit

GroupStep = Callable[[InputGroup, dict[str, Unit]], "dict[str, torch.Tensor] | None"]
"""``step(group, units)``: process one input group (``units`` maps every name of the block to its
:class:`prac.model.units.Unit`) and return the new fp32 ``[out, in]`` weights of the units it changed, or None."""

StatsReducer = Callable[[InputGroup], None]
"""``reduce(group)``: combine the group's statistics across processes, in place (identity by default)."""

StatsFactory = Callable[[int, torch.device, StatsSpec], InputStats]


class BlockParallel(Protocol):
    """Data-parallel hooks of the engine (implemented by :class:`prac.parallel.data_parallel.DataParallel`)."""

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

    def gather(self, items: list, what: str) -> list:
        """Every process's ``items`` (picklable), concatenated in process order, on every process
        (the structured pass's records, each made by the owner of its group)."""


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
