"""MoE plumbing of the engine: topping up the statistics of expert projections that got few tokens.

A router sends each expert only some of the calibration tokens, often fewer than its projection has
inputs (its own H is then singular), sometimes none. With ``EngineConfig.expert_min_tokens`` such a
projection's statistics are topped up with a *prior*: the statistics of every calibration token of
the block run through that expert (:meth:`prac.model.stats.InputStats.with_prior`), scaled by the
mean squared routing weight of the routed rows (:func:`route_scale`). The engine asks
:func:`expert_top_up` for a plan after a chunk is calibrated; when there is one it runs one more
forward of the block with the plan's :attr:`ExpertTopUp.hooks` (stopped at the experts), calling
:meth:`ExpertTopUp.begin` before each batch, then :meth:`ExpertTopUp.apply`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from prac.model.blocks import StopForward
from prac.model.experts import ExpertSlot, expert_hidden
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec
from prac.model.units import Unit

if TYPE_CHECKING:
    from prac.engine.config import BlockParallel

log = logging.getLogger(__name__)


def prior_key(slot: ExpertSlot) -> tuple[str, int | None]:
    """The prior an expert projection is topped up with: its experts module's input for gate/up (the
    same for every expert), its own hidden state over every token for down."""
    return slot.experts, (None if slot.reads_block_input else slot.index)


def route_scale(groups: list[InputGroup], units: dict[str, Unit]) -> dict[str, float]:
    """Mean r² of the routed rows of each experts module (over the groups of this chunk)."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        unit = units[g.names[0]]
        if unit.expert is not None:
            acc = sums.setdefault(unit.expert.experts, [0.0, 0])
            acc[0] += float(g.stats.route_sq)
            acc[1] += g.stats.count - g.stats.prior_tokens
    return {path: (s / n if n else 1.0) for path, (s, n) in sums.items()}


class ExpertTopUp:
    """The priors of the starved expert groups of one chunk (``poor``: (group, slot, tokens wanted)),
    collected by one forward with :attr:`hooks` and blended in by :meth:`apply`."""

    def __init__(self, poor: list[tuple[InputGroup, ExpertSlot, int]], spec: StatsSpec,
                 new_stats: Callable[[int, StatsSpec], InputStats], units: dict[str, Unit]):
        self.poor = poor
        # the fit share's rows alone, like the statistics they top up (the held-out ones are dropped)
        prior_spec = StatsSpec(hessian=spec.hessian, max_samples=spec.max_samples, seed=spec.seed, holdout=spec.holdout,
                               held=spec.held)
        self.priors: dict[tuple[str, int | None], InputStats] = {}  # every expert's gate/up reads the same tokens
        for g, slot, _ in poor:
            key = prior_key(slot)
            if key not in self.priors:
                self.priors[key] = new_stats(units[g.names[0]].in_features, prior_spec)
        modules = {slot.experts: slot for _, slot, _ in poor}
        self._pending = 0  # experts modules of the current batch not reached yet
        self._held: torch.Tensor | None = None  # the held-out flags of the batch being run
        self.hooks = {slot.module: self._hook(slot) for slot in modules.values()}

    def _hook(self, slot: ExpertSlot):
        wanted = [(e, stats) for (path, e), stats in self.priors.items() if path == slot.experts]

        def hook(_module, args):
            x = args[0]
            for e, stats in wanted:
                if e is None:
                    stats.add_batch(x, held=self._held)
                else:
                    stats.add_batch(expert_hidden(slot.module, slot.layout, slot.module._modules[str(e)], x),
                                    held=self._held)
            self._pending -= 1
            if self._pending == 0:
                raise StopForward
        return hook

    def begin(self, batch: int, held: torch.Tensor | None) -> None:
        """Before each calibration batch: its global index and held-out flags."""
        self._pending = len(self.hooks)
        self._held = held
        for stats in self.priors.values():
            stats.begin(batch)

    def apply(self, groups: list[InputGroup], units: dict[str, Unit], parallel: BlockParallel | None = None) -> None:
        """After the forward: the priors reduced over the processes and blended into the starved groups."""
        for (path, e), stats in self.priors.items():
            if parallel is not None:
                parallel.reduce_all(stats, f"prior of {path}" + ("" if e is None else f".{e}"))
            stats.finish()
        scale = route_scale(groups, units)
        for g, slot, need in self.poor:
            prior = self.priors[prior_key(slot)]
            # an expert without a token: the block's tokens alone, at their own count
            g.stats = g.stats.with_prior(prior, scale.get(slot.experts, 1.0), need if g.stats.count else prior.count)
            log.info("%s: %d routed tokens, topped up with %d of the block's (min %d)", ", ".join(g.names),
                     g.stats.count - g.stats.prior_tokens, g.stats.prior_tokens, need)


def expert_top_up(groups: list[InputGroup], units: dict[str, Unit], spec: StatsSpec, min_tokens: int | None,
                  new_stats: Callable[[int, StatsSpec], InputStats]) -> ExpertTopUp | None:
    """The top-up of the expert projections in ``groups`` whose input got fewer tokens than
    ``min_tokens`` (None: the projection's number of inputs) or none; None when there is none."""
    poor = []
    for g in groups:
        slot = units[g.names[0]].expert
        if slot is None:
            continue
        need = units[g.names[0]].in_features if min_tokens is None else min_tokens
        if g.stats.count == 0 or g.stats.count < need:
            poor.append((g, slot, need))
    return ExpertTopUp(poor, spec, new_stats, units) if poor else None
