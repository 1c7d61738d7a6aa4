"""This process's place in a ``torchrun`` launch, read from the environment: rank and world size, the
rank's device and backend, the collective timeout, printing on rank 0 and silencing the others, and the
contiguous share of ``n`` items each rank takes (:func:`split_range`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from prac.core.errors import PracError

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective may wait for the other ranks (``PRAC_DIST_TIMEOUT_S`` overrides it): long
enough for the slowest owner's solve of one block on a large model."""


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
