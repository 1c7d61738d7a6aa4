"""The data-parallel split of the work: the block engine's hooks (:class:`DataParallel`) and perplexity.

Per chunk of input groups an *owner* rank is chosen for each, balanced by cost (:func:`assign_owners`);
the group's statistics are reduced to it exactly (:mod:`prac.parallel.reduce`), it alone prunes, and
the new weights are broadcast (:meth:`DataParallel.exchange`). Evaluation windows are split into
contiguous shares and the NLL sums and token counts reduced (:func:`perplexity`).

**Calibration split.** The samples are drawn once, exactly as in one process, cut into the engine's
``batch_size`` batches, and each rank takes a *contiguous* run of whole batches (:func:`split_range`).
Contiguous whole batches, because (1) a rank's batches are then the very batches of the single-process
run, so the block forward of each is the same computation, and (2) the token sample's random keys are
drawn per batch from a generator seeded per group: a rank advances its generators past the batches
before its share (:meth:`DataParallel.new_stats`), so every token gets the key it gets in one process,
and the merge (gather every rank's candidates and keys, keep the top-k keys, in token order) is the
single-process sample exactly (up to two keys tying exactly at the k-th place).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prac.core.errors import PracError
from prac.core.records import LayerRecord
from prac.core.treesum import Node
from prac.model.group import InputGroup
from prac.model.stats import InputStats
from prac.parallel import reduce
from prac.parallel.launch import split_range

if TYPE_CHECKING:
    from prac.model.units import Unit
    from prac.parallel.session import Session

log = logging.getLogger(__name__)


def group_cost(group: InputGroup, units: dict[str, Unit]) -> float:
    """Work of pruning a group, whatever the method: one factorisation of its ``in × in`` H (in³) and,
    per linear, a solve against it (in² · out) — the SparseGPT/OBS shape; cheaper methods scale alike."""
    d = float(units[group.names[0]].in_features)
    return d ** 3 + sum(d * units[n].numel for n in group.names)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Greedy balanced owners (longest processing time first): each group, costliest first, goes to the
    least loaded rank (ties to the lower rank, then the earlier group) — the same on every rank."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


class DataParallel:
    """The block engine's data-parallel hooks (:class:`prac.engine.config.BlockParallel`) on a :class:`Session`.

    Engine order per block: :meth:`share` (once per run) → :meth:`new_stats` per accumulator →
    :meth:`assign` per chunk of groups → :meth:`reduce` per group → the step on :meth:`owns` only →
    :meth:`exchange` at the block's end; :meth:`gather_records` after the run."""

    def __init__(self, session: Session):
        self.session = session
        self._skip_rows: list[int] = []
        self._owner: dict[str, int] = {}
        self._group_names: dict[str, list[str]] = {}  # first name -> names, in step order over the run
        self._block_names: list[str] = []

    # calibration share
    def share(self, n: int, seqlen: int, batch_size: int) -> slice:
        """This rank's contiguous run of whole ``batch_size`` batches of the ``n`` calibration sequences
        of ``seqlen`` tokens."""
        world = self.session.world
        batches = math.ceil(n / batch_size)
        if batches < world:
            raise PracError(f"{n} calibration sequences make {batches} batch(es) of {batch_size} for {world} "
                            f"processes: every process needs one (more --nsamples or a smaller --batch-size)")
        start, stop = split_range(batches, world, self.session.rank)
        self._skip_rows = [min(batch_size, n - b * batch_size) * seqlen for b in range(start)]
        log.info("rank %d calibrates on sequences %d..%d of %d", self.session.rank, start * batch_size,
                 min(stop * batch_size, n), n)
        return slice(start * batch_size, min(stop * batch_size, n))

    def new_stats(self, stats: InputStats) -> InputStats:
        """Advance a fresh accumulator's sample generator past the batches before this rank's share
        (the same ``torch.rand`` calls the single-process run makes for them)."""
        generator = stats._generator
        if generator is not None:
            for rows in self._skip_rows:
                torch.rand(rows, generator=generator, device=stats.device)
        return stats

    # owners
    def assign(self, groups: list[InputGroup], units: dict[str, Unit]) -> None:
        """Owners of a chunk of groups, balanced by :func:`group_cost`."""
        owners = assign_owners([group_cost(g, units) for g in groups], self.session.world)
        for group, owner in zip(groups, owners):
            self._owner[group.names[0]] = owner
            self._group_names[group.names[0]] = list(group.names)
            self._block_names.extend(group.names)

    def owner(self, group: InputGroup) -> int:
        return self._owner[group.names[0]]

    def owns(self, group: InputGroup) -> bool:
        return self.owner(group) == self.session.rank

    # statistics
    def reduce(self, group: InputGroup) -> None:
        """Count, Σx and Σx² summed on every rank; H (and the dense-input drift) summed on the
        owner (dropped elsewhere); the token sample merged on the owner (dropped elsewhere); the same
        for the held-out share's statistics (with a held-out share the group's own are the fit
        share's: both trees are reduced apart, each as one process sums it)."""
        stats = group.stats
        if stats is None:
            return
        name, owner = group.names[0], self.owner(group)
        reduce.reduce_sums(self.session, stats, owner, name)
        if stats.heldout is not None:
            reduce.reduce_sums(self.session, stats.heldout, owner, f"held-out share of {name}")
        if stats.spec.max_samples > 0:
            reduce.merge_samples(self.session, stats, owner, name)

    def reduce_all(self, stats: InputStats, name: str) -> None:
        """Statistics shared by several groups (an MoE experts module's prior): everything summed, and
        the token sample merged, on every rank (and the held-out share's sums, if it has one)."""
        reduce.reduce_sums(self.session, stats, None, name)
        if stats.heldout is not None:
            reduce.reduce_sums(self.session, stats.heldout, None, f"held-out share of {name}")
        if stats.spec.max_samples > 0:
            reduce.merge_samples(self.session, stats, None, name)

    def sum_tensors(self, tensors: list[torch.Tensor], what: str) -> None:
        """Each tensor summed over the ranks, in place (:func:`prac.parallel.reduce.sum_tensors`)."""
        reduce.sum_tensors(self.session, tensors, what)

    def sum_tree(self, nodes: list[Node], template: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """The total of one fixed summation tree whose leaves the ranks hold in contiguous runs, on every
        rank, bit for bit as one process adds it (:func:`prac.parallel.reduce.sum_tree`)."""
        return reduce.sum_tree(self.session, nodes, template, what)

    # weights and records
    def exchange(self, staged: dict[str, torch.Tensor], linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Every rank gets every owner's new weights of the block (broadcast from the owner, in block order)."""
        s = self.session
        meta = {name: (tuple(w.shape), str(w.dtype).removeprefix("torch.")) for name, w in staged.items()}
        per_rank = s.all_gather_objects(meta, "weights of the block")
        order = {name: i for i, name in enumerate(self._block_names)}
        source = {name: r for r, names in enumerate(per_rank) for name in names}
        out: dict[str, torch.Tensor] = {}
        for name in sorted(source, key=lambda n: (order.get(n, len(order)), n)):
            src = source[name]
            shape, dtype = per_rank[src][name]
            tensor = (staged[name].contiguous() if src == s.rank
                      else torch.empty(shape, dtype=getattr(torch, dtype), device=s.device))
            out[name] = s.broadcast(tensor, src, f"weights of {name}")
        self._block_names = []
        return out

    def gather_records(self, records: list[LayerRecord], factorisations: dict[str, int]
                       ) -> tuple[list[LayerRecord], dict[str, int]]:
        """Every rank's records and factorisation counts, in the single-process order (group by group
        in step order, each group's linears in order), on every rank."""
        parts = self.session.all_gather_objects((records, factorisations), "layer records")
        groups = {first: i for i, first in enumerate(self._group_names)}

        def key(record: LayerRecord) -> tuple[int, int, str]:
            names = self._group_names.get(record.group, [])
            return (groups.get(record.group, len(groups)), names.index(record.name) if record.name in names else 0,
                    record.name)

        merged = sorted((r for rs, _ in parts for r in rs), key=key)
        counts = {k: v for _, fs in parts for k, v in fs.items()}
        return merged, {k: counts[k] for k in sorted(counts, key=lambda k: groups.get(k, len(groups)))}

    def gather(self, items: list, what: str) -> list:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        return [item for part in self.session.all_gather_objects(list(items), what) for item in part]

    def gather_grids(self, grids: dict[str, Any]) -> dict[str, Any]:
        """Every rank's quantization grids (name -> :class:`prac.quant.gptq.ColumnQuantizer`, on the CPU)."""
        parts = self.session.all_gather_objects({k: v.cpu() for k, v in grids.items()}, "quantization grids")
        return {k: v for part in parts for k, v in part.items()}


def perplexity(session: Session, model: nn.Module, windows: torch.Tensor, device: torch.device,
               batch_size: int = 1, progress: Any = None, desc: str = "eval") -> dict[str, Any]:
    """:func:`prac.parallel.evaluate.perplexity` over every rank: each scores its contiguous share of the windows,
    the float64 NLL sums and token counts are summed; same keys and meaning as the single-process result."""
    from prac.core.progress import no_progress
    from prac.parallel.evaluate import perplexity as local_perplexity

    lo, hi = split_range(int(windows.shape[0]), session.world, session.rank)
    nll, tokens = 0.0, 0
    if hi > lo:
        part = local_perplexity(model, windows[lo:hi], device, batch_size, progress or no_progress, desc=desc)
        tokens = int(part["predicted_tokens"])
        nll = float(part["nll_sum"]) if "nll_sum" in part else float(part["mean_nll"]) * tokens
    total = session.all_reduce(torch.tensor([nll, float(tokens)], dtype=torch.float64, device=session.device),
                               f"{desc} NLL")
    nll_sum, count = float(total[0]), int(total[1])
    mean = nll_sum / count
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return {"ppl": ppl, "mean_nll": mean, "finite": math.isfinite(ppl), "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "predicted_tokens": count}
