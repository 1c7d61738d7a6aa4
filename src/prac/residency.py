"""Where the blocks' weights live while the engine works: streamed one block at a time, or resident.

On the CPU nothing moves. On a GPU:

- **resident**: when every block's weights together take under ``resident_share`` of the free device
  memory (a 7B model in bf16, 14 GB, on an 80-141 GB card), all of them are moved once at the start
  and back once at the end: no transfer between blocks.
- **streamed**: otherwise one block is on the device at a time (plus the next one arriving). The next
  block's weights are copied from pinned host memory on a side stream while the current block is
  calibrated, pruned and propagated (:meth:`BlockMover.prefetch`); the current block goes back to
  the host when it is done. Pinned copies are made per block, just before its copy, and released when
  it is back on the host (pinned memory is not pageable: the whole model is never pinned at once).

The weights move by replacing each parameter's ``data`` (and each buffer), as ``nn.Module.to`` does:
the modules, and anything that holds them, stay the same objects.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def __init__(self, blocks: nn.ModuleList, device: torch.device, resident_share: float = 0.5,
                 count: int | None = None):
        self.blocks, self.device = blocks, device
        self.count = len(blocks) if count is None else count
        self.cuda = device.type == "cuda"
        total = sum(block_bytes(blocks[i]) for i in range(self.count))
        self.resident = self.cuda and total < resident_share * torch.cuda.mem_get_info(device)[0]
        self.stream = torch.cuda.Stream(device) if self.cuda and not self.resident else None
        self._pending: dict[int, tuple[torch.cuda.Event, list]] = {}
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
        event, moved = self._pending.pop(i)
        torch.cuda.current_stream(self.device).wait_event(event)
        for module, kind, name, old, new in moved:
            new.record_stream(torch.cuda.current_stream(self.device))
            _place(module, kind, name, old, new)

    def prefetch(self, i: int) -> None:
        """Start copying block ``i`` to the device on the side stream (streamed mode only)."""
        if self.resident or not self.cuda or i >= self.count or i in self._pending:
            return
        moved = []
        with torch.cuda.stream(self.stream):
            for module, kind, name, t in _tensors(self.blocks[i]):
                if t.device.type == "cuda":
                    continue
                host = t.data if t.data.is_pinned() else t.data.pin_memory()
                moved.append((module, kind, name, t, host.to(self.device, non_blocking=True)))
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending[i] = (event, moved)

    def release(self, i: int) -> None:
        """Block ``i`` back to the host (streamed mode; resident blocks stay until :meth:`finish`)."""
        if self.resident:
            return
        self.blocks[i].to("cpu")

    def finish(self) -> None:
        """Every block back on the host."""
        if self.resident and self._moved_all:
            for j in range(self.count):
                self.blocks[j].to("cpu")
            self._moved_all = False
        for event, moved in self._pending.values():  # prefetched but never used (an early stop)
            event.synchronize()
        self._pending.clear()
