"""Data-parallel pruning and evaluation over several processes (``torchrun``), with torch.distributed.

``torchrun --nproc-per-node N -m prac prune …`` starts N processes (*ranks*); each loads the model
(CPU-resident, as in one process) and the same calibration tokens, then takes a disjoint share of
them. Per block, every rank collects the statistics of each input group on its share, they are
reduced, one *owner* rank prunes (and corrects) the group, the new weights are broadcast, and every
rank propagates its own share. Evaluation windows are split the same way and the NLL sums and token
counts reduced. Without torchrun (``WORLD_SIZE`` unset or 1) none of this runs.

The pieces, in the shapes of nanochat's helpers and llm-compressor's GPTQ owner-rank pattern:

- :func:`launch_info` (rank/world from the environment torchrun sets), :func:`init` (the process
  group with a timeout: gloo on the CPU, NCCL on CUDA, chosen from the device), :func:`active`,
  :func:`print0`.
- :class:`FailureBoard`: the failure protocol on the launcher's key-value store. A rank that fails
  posts its one-line error and exit code there; every collective is issued asynchronously and
  polled (:meth:`Session.wait`), so the other ranks see the post within ~50 ms, raise
  :class:`PeerFailed` and exit with the same code without printing. An atomic counter makes the first
  failing rank the only one that prints, so an error every rank hits (bad input) appears once.
  Collectives give up after ``PRAC_DIST_TIMEOUT_S`` seconds (default 1800) with a one-line error.
- :class:`DataParallel`: the block engine's hooks (:class:`prac.engine.loop.BlockParallel`).

**Calibration split.** The samples are drawn once, exactly as in one process, cut into the engine's
``batch_size`` batches, and each rank takes a *contiguous* run of whole batches (:func:`split_range`).
Contiguous whole batches, because (1) a rank's batches are then the very batches of the single-process
run, so the block forward of each is the same computation, and (2) the token sample's random keys are
drawn per batch from a generator seeded per group: a rank advances its generators past the batches
before its share (:meth:`DataParallel.new_stats`), so every token gets the key it gets in one process,
and the merge (gather every rank's candidates and keys, keep the top-k keys, in token order) is the
single-process sample exactly (up to two keys tying exactly at the k-th place).

**Bit-identical across world sizes** (``docs/distributed.md``): counts, the token sample, every
forward of a batch, and every summed statistic — Σx, Σx², H, the drift, the held-out share's — which
the engine accumulates per batch and adds along one fixed tree over the batches' global indices
(:mod:`prac.core.treesum`); :meth:`DataParallel._combine_nodes` hands each rank's part of that tree to the
owner, which adds it exactly as one process would. So masks and weights are the same at any world
size (same thread count and batch size). The perplexity's float64 NLL sum is re-associated (~1e-16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from prac.core.errors import PracError
from prac.core.records import LayerRecord
from prac.core.treesum import Node, fold, push
from prac.model.group import InputGroup
from prac.model.stats import InputStats

if TYPE_CHECKING:
    from prac.model.units import Unit

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective may wait for the other ranks (``PRAC_DIST_TIMEOUT_S`` overrides it): long
enough for the slowest owner's solve of one block on a large model."""

_POLL_STORE_S = 0.05


# --- rank/world info, devices, printing ------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """This process's place in the launch: ``rank`` of ``world``, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info(env: os._Environ[str] | dict[str, str] = os.environ) -> Launch:
    """Rank, world size and local rank from the variables torchrun sets (one process without them)."""
    try:
        return Launch(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise PracError(f"malformed RANK/WORLD_SIZE/LOCAL_RANK in the environment: {exc}") from exc


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(spec: str, launch: Launch) -> torch.device:
    """The compute device of this rank: ``auto``/``cuda`` give ``cuda:LOCAL_RANK``; ``cpu`` the CPU.

    An explicit ``cuda:i`` with several ranks is refused: every rank would share one GPU."""
    from prac.model.loading import resolve_device

    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    if device.index is not None and launch.distributed:
        raise PracError(f"--device {spec} with {launch.world} processes would put them all on one GPU: "
                        f"use --device cuda (each process takes cuda:LOCAL_RANK)")
    if launch.local_rank >= torch.cuda.device_count():
        raise PracError(f"process {launch.rank} has LOCAL_RANK {launch.local_rank} but only "
                        f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", launch.local_rank)


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (every process when not distributed)."""
    if launch_info().is_main:
        print(*args, **kwargs)


@contextlib.contextmanager
def quiet_unless_main(launch: Launch) -> Iterator[None]:
    """On ranks other than 0, send stdout and stderr (prints, logging, progress bars) to nowhere."""
    if launch.is_main:
        yield
        return
    sink = open(os.devnull, "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        sink.close()


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one,
    the larger shares first)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def timeout_s() -> float:
    """The collective timeout: ``PRAC_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("PRAC_DIST_TIMEOUT_S")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise PracError(f"PRAC_DIST_TIMEOUT_S must be a number of seconds, got {text!r}") from exc
    if not value > 0:
        raise PracError(f"PRAC_DIST_TIMEOUT_S must be positive, got {value}")
    return value


# --- the failure protocol ---------------------------------------------------------------------------

class PeerFailed(Exception):
    """Another rank failed (and printed the error); this one stops silently with the same exit code."""

    def __init__(self, rank: int, message: str, code: int):
        super().__init__(f"process {rank} failed: {message}")
        self.rank, self.message, self.code = rank, message, code


class FailureBoard:
    """The failure protocol on the launcher's TCP key-value store (see the module docstring).

    Keys live under ``prac/<restart count>/`` so a restarted worker group starts clean."""

    ACK_WAIT_S = 5.0

    def __init__(self, store: dist.Store, launch: Launch, prefix: str = "prac/0/"):
        self.store, self.launch, self.prefix = store, launch, prefix
        self._next_check = 0.0

    @classmethod
    def connect(cls, launch: Launch, timeout: float) -> FailureBoard:
        """A client of the store torchrun's agent runs (``TORCHELASTIC_USE_AGENT_STORE``), else rank 0
        hosts one at ``MASTER_ADDR:MASTER_PORT`` (as ``init_process_group``'s ``env://`` does)."""
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as exc:
            raise PracError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start prac with torchrun") from exc
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, launch.world, is_master=launch.is_main and not agent,
                              timeout=timedelta(seconds=timeout), wait_for_workers=False)
        return cls(store, launch, f"prac/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")

    def _key(self, name: str) -> str:
        return self.prefix + name

    def fail(self, code: int, message: str) -> bool:
        """Post this rank's failure; True when it is the first (the one that prints).

        The first failing rank then waits (at most :attr:`ACK_WAIT_S`) for every rank to acknowledge,
        so the others stop on the post rather than on the launcher killing them."""
        try:
            first = self.store.add(self._key("failures"), 1) == 1
            if first:
                self.store.set(self._key("error"),
                               json.dumps({"rank": self.launch.rank, "message": message, "code": code}))
            self.store.add(self._key("stopped"), 1)
            if first:
                deadline = time.monotonic() + self.ACK_WAIT_S
                while self.store.add(self._key("stopped"), 0) < self.launch.world and time.monotonic() < deadline:
                    time.sleep(0.01)
            return first
        except Exception:  # the store is gone: say it here rather than not at all
            return True

    def check(self, force: bool = False) -> None:
        """Raise :class:`PeerFailed` if some rank has posted a failure (the store is asked at most every 50 ms)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + _POLL_STORE_S
        if self.store.check([self._key("failures")]):
            info = json.loads(self.store.get(self._key("error")))
            raise PeerFailed(int(info["rank"]), str(info["message"]), int(info["code"]))


# --- the process group -------------------------------------------------------------------------------

class Session:
    """The process group of a data-parallel run: polled collectives with a timeout, on ``device``."""

    def __init__(self, launch: Launch, device: torch.device, board: FailureBoard, timeout: float):
        self.launch, self.device, self.board, self.timeout = launch, device, board, timeout
        self.backend = backend_for(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(self.backend, store=board.store, rank=launch.rank, world_size=launch.world,
                                timeout=timedelta(seconds=timeout))

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world(self) -> int:
        return self.launch.world

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for an asynchronous collective, watching for a peer's failure and the timeout."""
        deadline = time.monotonic() + self.timeout
        delay = 1e-4
        while not work.is_completed():
            self.board.check()
            if time.monotonic() > deadline:
                raise PracError(f"timed out after {self.timeout:.0f} s waiting for the other processes ({what}); "
                                f"PRAC_DIST_TIMEOUT_S sets the limit")
            time.sleep(delay)
            delay = min(2 * delay, 0.01)
        try:
            work.wait()
        except Exception as exc:
            self.board.check(force=True)
            raise PracError(f"collective {what} failed: {exc}") from exc

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        self.wait(dist.all_reduce(t, async_op=True), what)
        return t

    def reduce(self, t: torch.Tensor, dst: int, what: str) -> torch.Tensor:
        self.wait(dist.reduce(t, dst, async_op=True), what)
        return t

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        self.wait(dist.broadcast(t, src, async_op=True), what)
        return t

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.wait(dist.all_gather(out, t.contiguous(), async_op=True), what)
        return out

    def all_gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order; the polled counterpart of ``all_gather_object``."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        sizes = [int(s) for s in self.all_gather(size, what)]
        buffer = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        buffer[: payload.numel()] = payload.to(self.device)
        parts = self.all_gather(buffer, what)
        return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, sizes)]

    def barrier(self, what: str) -> None:
        self.all_reduce(torch.zeros(1, device=self.device), what)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


_ACTIVE: Session | None = None


def init(launch: Launch, device_spec: str, board: FailureBoard) -> Session:
    """Start this rank's process group (gloo or NCCL from the device) and make it :func:`active`."""
    global _ACTIVE
    device = rank_device(device_spec, launch)
    _ACTIVE = Session(launch, device, board, timeout_s())
    log.info("rank %d of %d on %s (%s)", launch.rank, launch.world, device, _ACTIVE.backend)
    return _ACTIVE


def active() -> Session | None:
    """The running data-parallel session, or None in a single-process run."""
    return _ACTIVE


def shutdown() -> None:
    """Close the active session's process group (after a successful run)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
        _ACTIVE = None


# --- the block engine's hooks --------------------------------------------------------------------------

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
    """The block engine's data-parallel hooks (:class:`prac.engine.loop.BlockParallel`) on a :class:`Session`.

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
        self._reduce_sums(stats, owner, name)
        if stats.heldout is not None:
            self._reduce_sums(stats.heldout, owner, f"held-out share of {name}")
        if stats.spec.max_samples > 0:
            self._merge_samples(stats, owner, name)

    def reduce_all(self, stats: InputStats, name: str) -> None:
        """Statistics shared by several groups (an MoE experts module's prior): everything summed, and
        the token sample merged, on every rank (and the held-out share's sums, if it has one)."""
        self._reduce_sums(stats, None, name)
        if stats.heldout is not None:
            self._reduce_sums(stats.heldout, None, f"held-out share of {name}")
        if stats.spec.max_samples > 0:
            self._merge_samples(stats, None, name)

    def _reduce_sums(self, stats: InputStats, owner: int | None, name: str) -> None:
        """Count, Σx, Σx² and Σr² on every rank; H and the drift on ``owner`` (None: every rank).
        Statistics summed in the engine's fixed order (:attr:`InputStats.ordered`) are combined along
        the same tree as in one process (:meth:`_combine_nodes`): bit-identical for any world size."""
        s = self.session
        count = s.all_reduce(torch.tensor([stats.count], dtype=torch.int64, device=stats.device), f"count of {name}")
        stats.count = int(count.item())
        if stats.ordered:
            self._combine_nodes(stats, owner, name)
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

    def _combine_nodes(self, stats: InputStats, owner: int | None, name: str) -> None:
        """Every rank's part of the fixed summation tree (:mod:`prac.core.treesum`), in rank order (ranks hold
        contiguous runs of batches): the vectors to every rank, the matrices to ``owner`` (every rank
        when None; sent by broadcast, the other ranks drop them), then added exactly as one process
        adds its batches."""
        s = self.session
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

    def _merge_samples(self, stats: InputStats, owner: int | None, name: str) -> None:
        """The single-process sample: every rank's candidates (≤ k each, with their keys and held-out
        flags) gathered, the k largest keys kept, in token order — what ``InputStats._add_samples``
        keeps over all batches (the pool of both shares; its fit rows are ``samples``)."""
        k, s = stats.spec.max_samples, self.session
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

    def sum_tensors(self, tensors: list[torch.Tensor], what: str) -> None:
        """Each tensor summed over the ranks, in place (reconstruction's gradients and error sums: every
        rank then takes the same optimiser step)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.session.all_reduce(flat, what)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_tree(self, nodes: list[Node], template: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """The total of one fixed summation tree (:mod:`prac.core.treesum`) whose leaves the ranks hold in
        contiguous runs, in rank order (reconstruction's per-batch gradients and errors), on every rank:
        each rank's stack ``nodes`` (maybe empty; fields shaped as ``template``, one dtype) sent to
        every rank by broadcast, one flat tensor per node, then added as one process adds its batches.
        Every rank then takes the same optimiser step as one process, bit for bit."""
        s = self.session
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

    def gather_grids(self, grids: dict[str, Any]) -> dict[str, Any]:
        """Every rank's quantization grids (name -> :class:`prac.quant.gptq.ColumnQuantizer`, on the CPU)."""
        parts = self.session.all_gather_objects({k: v.cpu() for k, v in grids.items()}, "quantization grids")
        return {k: v for part in parts for k, v in part.items()}


# --- evaluation ------------------------------------------------------------------------------------------

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


def describe(session: Session | None) -> dict[str, Any]:
    """What the report's ``environment`` records about the launch: ``world_size`` and ``backend``."""
    if session is None:
        return {"world_size": 1, "backend": None}
    return {"world_size": session.world, "backend": session.backend}
