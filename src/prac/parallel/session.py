"""Data-parallel pruning and evaluation over several processes (``torchrun``), with torch.distributed.

``torchrun --nproc-per-node N -m prac prune …`` starts N processes (*ranks*); each loads the model
(CPU-resident, as in one process) and the same calibration tokens, then takes a disjoint share of
them. Per block, every rank collects the statistics of each input group on its share, they are
reduced, one *owner* rank prunes (and corrects) the group, the new weights are broadcast, and every
rank propagates its own share. Evaluation windows are split the same way and the NLL sums and token
counts reduced. Without torchrun (``WORLD_SIZE`` unset or 1) none of this runs.

The pieces, in the shapes of nanochat's helpers and llm-compressor's GPTQ owner-rank pattern:

- :mod:`prac.parallel.launch`: :func:`launch_info` (rank/world from the environment torchrun sets),
  the rank's device, :func:`print0`, the collective timeout.
- This module: :class:`Session`, the process group with a timeout (gloo on the CPU, NCCL on CUDA,
  chosen from the device) and polled collectives; :func:`init`, :func:`active`, :func:`shutdown`.
- :mod:`prac.parallel.failures`: :class:`FailureBoard`, the failure protocol on the launcher's
  key-value store. A rank that fails posts its error there; every collective is polled
  (:meth:`Session.wait`), so the other ranks raise :class:`PeerFailed` within ~50 ms and exit with
  the same code without printing. Collectives give up after ``PRAC_DIST_TIMEOUT_S`` seconds (default
  1800) with a one-line error.
- :mod:`prac.parallel.data_parallel`: :class:`DataParallel`, the block engine's hooks
  (:class:`prac.engine.config.BlockParallel`): calibration share, owners, weights; and the perplexity
  over the ranks.
- :mod:`prac.parallel.reduce`: the exact sums of the statistics over the ranks.

Their public names are re-exported here, so ``from prac.parallel import session as distributed`` serves
them all (``distributed.DataParallel``, ``distributed.launch_info``, …).
"""

from __future__ import annotations

import logging
import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from prac.core.errors import PracError
from prac.parallel.data_parallel import DataParallel, assign_owners, group_cost, perplexity
from prac.parallel.failures import FailureBoard, PeerFailed
from prac.parallel.launch import (
    DEFAULT_TIMEOUT_S,
    Launch,
    backend_for,
    launch_info,
    print0,
    quiet_unless_main,
    rank_device,
    split_range,
    timeout_s,
)

__all__ = [
    "Session", "init", "active", "shutdown", "describe",
    "Launch", "launch_info", "backend_for", "rank_device", "print0", "quiet_unless_main", "split_range",
    "timeout_s", "DEFAULT_TIMEOUT_S",
    "FailureBoard", "PeerFailed",
    "DataParallel", "assign_owners", "group_cost", "perplexity",
]

log = logging.getLogger(__name__)


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


def describe(session: Session | None) -> dict[str, Any]:
    """What the report's ``environment`` records about the launch: ``world_size`` and ``backend``."""
    if session is None:
        return {"world_size": 1, "backend": None}
    return {"world_size": session.world, "backend": session.backend}
