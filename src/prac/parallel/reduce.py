"""Exact sums over the ranks: an input group's statistics, its token sample, and any fixed summation tree.

**Bit-identical across world sizes** (``docs/distributed.md``): counts, the token sample, every
forward of a batch, and every summed statistic — Σx, Σx², H, the drift, the held-out share's — which
the engine accumulates per batch and adds along one fixed tree over the batches' global indices
(:mod:`prac.core.treesum`); :func:`combine_nodes` hands each rank's part of that tree to the owner,
which adds it exactly as one process would (:func:`sum_tree` does the same for reconstruction's
gradients and errors, on every rank). So masks and weights are the same at any world size (same
thread count and batch size). Statistics not accumulated in that fixed order are all-reduced, and the
perplexity's float64 NLL sum is re-associated (~1e-16).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prac.core.treesum import Node, fold, push
from prac.model.stats import InputStats

if TYPE_CHECKING:
    from prac.parallel.session import Session


def reduce_sums(session: Session, stats: InputStats, owner: int | None, name: str) -> None:
    """Count, Σx, Σx² and Σr² on every rank; H and the drift on ``owner`` (None: every rank).
    Statistics summed in the engine's fixed order (:attr:`InputStats.ordered`) are combined along
    the same tree as in one process (:func:`combine_nodes`): bit-identical for any world size."""
    s = session
    count = s.all_reduce(torch.tensor([stats.count], dtype=torch.int64, device=stats.device), f"count of {name}")
    stats.count = int(count.item())
    if stats.ordered:
        combine_nodes(session, stats, owner, name)
    else:
        moments = s.all_reduce(torch.cat([stats.sum, stats.sumsq, stats.route_sq.reshape(1)]), f"sums of {name}")
        stats.sum, stats.sumsq = moments[: stats.dim].clone(), moments[stats.dim: 2 * stats.dim].clone()
        stats.route_sq = moments[2 * stats.dim].clone()
        for key, t in (("Hessian", stats.hessian), ("dense-input drift", stats.drift),
                       *((f"dense-input drift through {k}", v) for k, v in sorted((stats.drift_out or {}).items()))):
            if t is None:
                continue
            if owner is None:
                s.all_reduce(t, f"{key} of {name}")
            else:
                s.reduce(t, owner, f"{key} of {name}")
    if owner is not None and owner != s.rank:
        stats.hessian, stats.drift = None, None
        if stats.drift_out is not None:
            stats.drift_out = None


def combine_nodes(session: Session, stats: InputStats, owner: int | None, name: str) -> None:
    """Every rank's part of the fixed summation tree (:mod:`prac.core.treesum`), in rank order (ranks hold
    contiguous runs of batches): the vectors to every rank, the matrices to ``owner`` (every rank
    when None; sent by broadcast, the other ranks drop them), then added exactly as one process
    adds its batches."""
    s = session
    mine = stats.nodes()
    template = mine[0].tensors if mine else stats._fields()
    vectors = ("sum", "sumsq", "route_sq")
    matrices = sorted(k for k in template if k not in vectors)
    layout = s.all_gather_objects([(n.start, n.size) for n in mine], f"batches of {name}")
    runs = []
    for r, spans in enumerate(layout):
        run = []
        for i, (start, size) in enumerate(spans):
            own = mine[i].tensors if r == s.rank else None
            flat = (torch.cat([own["sum"], own["sumsq"], own["route_sq"].reshape(1)]) if own is not None
                    else torch.empty(2 * stats.dim + 1, dtype=torch.float32, device=stats.device))
            s.broadcast(flat, r, f"sums of {name}")
            tensors = {"sum": flat[: stats.dim], "sumsq": flat[stats.dim: 2 * stats.dim],
                       "route_sq": flat[2 * stats.dim]}
            for key in matrices:  # a broadcast (an exact copy) rather than a point-to-point send: polled
                if r == owner == s.rank:
                    tensors[key] = own[key]
                elif r != owner:
                    t = own[key] if own is not None else torch.empty_like(template[key])
                    s.broadcast(t, r, f"{key} of {name}")
                    if owner is None or s.rank == owner:
                        tensors[key] = t
            run.append(Node(start, size, tensors))
        runs.append(run)
    stats.finish(runs)


def merge_samples(session: Session, stats: InputStats, owner: int | None, name: str) -> None:
    """The single-process sample: every rank's candidates (≤ k each, with their keys and held-out
    flags) gathered, the k largest keys kept, in token order — what ``InputStats._add_samples``
    keeps over all batches (the pool of both shares; its fit rows are ``samples``)."""
    k, s = stats.spec.max_samples, session
    have = 0 if stats.sample_pool is None else stats.sample_pool.shape[0]
    table = torch.zeros(k, stats.dim + 2, dtype=torch.float32, device=stats.device)
    if have:
        table[:have, : stats.dim] = stats.sample_pool
        table[:have, stats.dim] = stats._keys
        if stats.sample_held is not None:
            table[:have, stats.dim + 1] = stats.sample_held.float()
    counts = s.all_gather(torch.tensor([have], dtype=torch.int64, device=stats.device), f"samples of {name}")
    tables = s.all_gather(table, f"samples of {name}")
    if owner is not None and owner != s.rank:
        stats.set_sample_pool(None, None, None)
        return
    merged = torch.cat([t[: int(c)] for t, c in zip(tables, counts)])
    if merged.shape[0] == 0:
        stats.set_sample_pool(None, None, None)
        return
    if merged.shape[0] > k:
        keep = torch.topk(merged[:, stats.dim], k, sorted=False).indices.sort().values
        merged = merged[keep]
    stats.set_sample_pool(merged[:, : stats.dim].contiguous(), merged[:, stats.dim].contiguous(),
                          merged[:, stats.dim + 1] > 0.5 if stats.heldout is not None else None)


def sum_tensors(session: Session, tensors: list[torch.Tensor], what: str) -> None:
    """Each tensor summed over the ranks, in place (reconstruction's gradients and error sums: every
    rank then takes the same optimiser step)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    session.all_reduce(flat, what)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_tree(session: Session, nodes: list[Node], template: dict[str, torch.Tensor], what: str
             ) -> dict[str, torch.Tensor]:
    """The total of one fixed summation tree (:mod:`prac.core.treesum`) whose leaves the ranks hold in
    contiguous runs, in rank order (reconstruction's per-batch gradients and errors), on every rank:
    each rank's stack ``nodes`` (maybe empty; fields shaped as ``template``, one dtype) sent to
    every rank by broadcast, one flat tensor per node, then added as one process adds its batches.
    Every rank then takes the same optimiser step as one process, bit for bit."""
    s = session
    keys = list(template)
    sizes = [template[k].numel() for k in keys]
    dtype = template[keys[0]].dtype
    layout = s.all_gather_objects([(n.start, n.size) for n in nodes], f"batches of {what}")
    stack: list[Node] = []  # pushed as they arrive (what treesum.combine does): log2(leaves) + 1 held at most
    for r, spans in enumerate(layout):
        for i, (start, size) in enumerate(spans):
            flat = (torch.cat([nodes[i].tensors[k].reshape(-1).to(dtype) for k in keys]) if r == s.rank
                    else torch.empty(sum(sizes), dtype=dtype, device=s.device))
            s.broadcast(flat, r, what)
            push(stack, Node(start, size, {k: p.view_as(template[k]) for k, p in zip(keys, flat.split(sizes))}))
    total = fold(stack)
    return total if total is not None else {k: torch.zeros_like(v) for k, v in template.items()}
