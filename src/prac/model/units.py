"""The prunable unit: one weight matrix, where it lives, and the module that reads its input.

A :class:`Unit` is what every part of a run shares about a weight it prunes: the engine hooks
``unit.module`` to record its input, the step reads and writes the weight through :meth:`Unit.read` and
:meth:`Unit.write` (``[out, in]`` fp32 whatever the storage: ``nn.Linear``, GPT-2's transposed
``Conv1D``, or one projection of a fused expert, :mod:`prac.model.experts`), records carry its
:attr:`Unit.kind` and expert. :func:`block_units` finds a block's units; :func:`model_units` walks
every block (installing and removing the expert views) for the checks made before any work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prac.core.errors import PracError
from prac.model.blocks import Blocks, Conv1D, find_blocks, find_linears, get_weight, in_features, set_weight
from prac.model.experts import (
    ExpertLinear,
    ExpertSlot,
    check_experts,
    expert_of,
    expert_views,
    find_experts,
    left_dense,
    routers,
)


@dataclass(frozen=True)
class Unit:
    """A prunable weight matrix. ``expert``: where it lives in a fused experts module, for a
    projection of an MoE expert, else None."""

    name: str
    module: nn.Module
    block: int = 0
    expert: ExpertSlot | None = None

    @property
    def kind(self) -> str:
        if self.expert is not None:
            return "expert"
        return "conv1d" if Conv1D and isinstance(self.module, Conv1D) else "linear"

    @property
    def weight(self) -> torch.Tensor:
        """The module's own weight parameter (its layout, its dtype)."""
        return self.module.weight

    @property
    def in_features(self) -> int:
        return in_features(self.module)

    @property
    def out_features(self) -> int:
        return self.module.weight.numel() // self.in_features

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    def read(self) -> torch.Tensor:
        """The weight as an fp32 ``[out, in]`` copy."""
        return get_weight(self.module)

    def write(self, weight: torch.Tensor) -> None:
        """Store an fp32 ``[out, in]`` weight in the module's layout and dtype (through the view into
        the fused tensor for an expert)."""
        set_weight(self.module, weight)


def block_units(block: nn.Module, prefix: str = "", ignore: str | None = None, index: int = 0) -> dict[str, Unit]:
    """The units of ``block`` by full name (forward-registration order), minus ``ignore`` and routers.
    Expert projections are included only inside :func:`prac.model.experts.expert_views` (called with the
    same ``ignore``, which leaves the experts it names without views)."""
    experts = find_experts(block)
    out = {}
    for name, module in find_linears(block, prefix, ignore).items():
        where = expert_of(name, experts, prefix) if isinstance(module, ExpertLinear) else None
        out[name] = Unit(name, module, index, where)
    return out


def model_units(model: nn.Module, ignore: str | None = None) -> Iterator[tuple[Blocks, int, dict[str, Unit]]]:
    """``(blocks, i, units of block i)`` for every block, its expert views installed for the duration
    of the step (the units' modules are only valid inside it)."""
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.modules):
        with expert_views(block, blocks.name(i), ignore):
            yield blocks, i, block_units(block, blocks.name(i), ignore, i)


def check_block_parameters(model: nn.Module, ignore: str | None = None) -> Blocks:
    """Fail with one line, before any work, on a weight matrix inside the blocks that prac would leave
    unpruned without a word: any parameter of two or more dimensions that is neither a prunable
    linear's, nor a fused experts module's whose layout prac reads (checked on its first block, see
    :func:`prac.model.experts.check_experts`), nor a router's — unless ``ignore`` matches its name."""
    blocks = find_blocks(model)
    pattern = re.compile(ignore) if ignore else None
    checked: set[type] = set()
    for i, block in enumerate(blocks.modules):
        prefix = blocks.name(i)
        covered: set[int] = set()
        for module in find_linears(block).values():
            covered.update(id(p) for p in module.parameters(recurse=False))
        for module in routers(block).values():
            covered.update(id(p) for p in module.parameters(recurse=False))
        for path, (module, layout) in find_experts(block).items():
            full = f"{prefix}.{path}"
            if left_dense(module, layout, full, ignore):
                continue  # the user leaves these experts dense
            if type(module) not in checked:
                check_experts(module, full)
                checked.add(type(module))
            covered.update(id(p) for p in module.parameters(recurse=False))
        for name, param in block.named_parameters():
            full = f"{prefix}.{name}"
            if param.dim() < 2 or id(param) in covered or (pattern is not None and pattern.search(full)):
                continue
            raise PracError(f"cannot prune {full} (shape {list(param.shape)}): a weight of a layout prac does not "
                            f"know; --ignore it to leave it dense")
    return blocks


def block_weight_counts(block: nn.Module) -> tuple[int, int]:
    """(zeros, entries) over every parameter of two or more dimensions of ``block`` (its weight
    matrices: linears, fused experts, routers, whether pruned or not)."""
    zeros = total = 0
    with torch.no_grad():
        for param in block.parameters():
            if param.dim() >= 2:
                zeros += int((param == 0).sum())
                total += param.numel()
    return zeros, total
