"""Where the blocks' weights live while the engine works: streamed one block at a time, or resident.

On the CPU nothing moves. On a GPU:

- **resident**: when every block's weights together take under :data:`prac.engine.memory.RESIDENT_SHARE`
  of the free device memory (a 7B model in bf16, 14 GB, on an 80-141 GB card), all of them are moved
  once at the start and back once at the end: no transfer between blocks.
- **streamed**: otherwise one block is on the device at a time (plus the next one arriving). While
  block ``i`` is calibrated, pruned and propagated, a background thread copies block ``i + 1``'s
  weights into pinned host memory and queues their host-to-device copies on a side stream
  (:meth:`BlockMover.prefetch`); neither the pinning nor the copies hold up block ``i``'s work on the
  current stream. :meth:`BlockMover.fetch` waits for the thread (the host side) and makes the current
  stream wait for the side stream's event (the device side) before the weights are used; the copies
  are then marked as used on the current stream (``record_stream``), so their memory is not reused
  while that stream may still read them. The current block goes back to the host when it is done.
  Pinned copies are made per block, just before its copy, and dropped once the copy is queued (the
  pinned-memory allocator keeps a buffer until the copies that read it are done; the whole model is
  never pinned at once).

The weights move by replacing each parameter's ``data`` (and each buffer), as ``nn.Module.to`` does:
the modules, and anything that holds them, stay the same objects. The copies are exact, so streamed
and resident runs give bit-identical masks and weights (``tests/test_cuda_streaming.py``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from prac.engine.memory import resident

log = logging.getLogger(__name__)


def _tensors(block: nn.Module):
    """(module, kind, name, tensor) for every parameter and buffer of ``block``."""
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None:
                yield module, "param", name, p
        for name, b in module._buffers.items():
            if b is not None:
                yield module, "buffer", name, b


def _place(module: nn.Module, kind: str, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if kind == "param":
        old.data = new
    else:
        module._buffers[name] = new


def block_bytes(block: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _m, _k, _n, t in _tensors(block))


class BlockMover:
    """Moves ``blocks`` (an ``nn.ModuleList``) to ``device`` and back, resident or streamed (see the
    module docstring). ``fetch(i)`` before block ``i`` is processed, ``prefetch(i + 1)`` right after,
    ``release(i)`` when it is done, ``finish()`` at the end."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, resident_share: float | None = None,
                 count: int | None = None):
        self.blocks, self.device = blocks, device
        if device.type == "cuda" and device.index is None:  # the prefetch thread's default device may differ
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.count = len(blocks) if count is None else count
        self.cuda = self.device.type == "cuda"
        total = sum(block_bytes(blocks[i]) for i in range(self.count))
        self.resident = self.cuda and resident(total, self.device, resident_share)
        self.stream = torch.cuda.Stream(self.device) if self.cuda and not self.resident else None
        self._pool: ThreadPoolExecutor | None = None  # the prefetch thread (streamed mode), made on first use
        self._pending: dict[int, Future] = {}  # block -> (side-stream event, moved tensors), once queued
        self._moved_all = False

    def fetch(self, i: int) -> None:
        """Block ``i`` on the device (waiting for its prefetch if one is under way)."""
        if not self.cuda:
            self.blocks[i].to(self.device)
            return
        if self.resident:
            if not self._moved_all:
                for j in range(self.count):
                    self.blocks[j].to(self.device)
                self._moved_all = True
            return
        if i not in self._pending:
            self.prefetch(i)
        event, moved = self._pending.pop(i).result()  # the copies are queued (the event recorded after them)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # the current stream's later work waits for the copies, the host does not
        for module, kind, name, old, new in moved:
            new.record_stream(current)  # allocated on the side stream, read on this one
            _place(module, kind, name, old, new)

    def prefetch(self, i: int) -> None:
        """Start copying block ``i`` to the device (streamed mode only): pinned on the prefetch thread,
        copied on the side stream; returns at once."""
        if self.resident or not self.cuda or i >= self.count or i in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prac-prefetch")
        self._pending[i] = self._pool.submit(self._copy, i)

    def _copy(self, i: int) -> tuple[torch.cuda.Event, list]:
        """On the prefetch thread: every host tensor of block ``i`` pinned and its copy queued on the
        side stream; an event recorded on the side stream after the last copy."""
        moved = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for module, kind, name, t in list(_tensors(self.blocks[i])):
                if t.device.type == "cuda":
                    continue
                host = t.data if t.data.is_pinned() else t.data.pin_memory()
                moved.append((module, kind, name, t, host.to(self.device, non_blocking=True)))
            event = torch.cuda.Event()
            event.record(self.stream)
        return event, moved

    def release(self, i: int) -> None:
        """Block ``i`` back to the host (streamed mode; resident blocks stay until :meth:`finish`)."""
        if self.resident:
            return
        self.blocks[i].to("cpu")

    def finish(self) -> None:
        """Every block back on the host; prefetches never used (an early stop) completed and dropped."""
        if self.resident and self._moved_all:
            for j in range(self.count):
                self.blocks[j].to("cpu")
            self._moved_all = False
        for i, future in self._pending.items():
            try:
                event, _moved = future.result()
                event.synchronize()
            except Exception as exc:  # a block that was never used: its weights stay on the host
                log.warning("prefetch of block %d failed (unused): %s", i, exc)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
