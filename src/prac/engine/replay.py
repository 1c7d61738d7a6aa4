"""Replay: the outputs of a block's settled submodules, kept from one calibration forward for the next.

A sequential calibration (``--sequential``, and ``--dense-target`` which implies it) runs the block
once per input group, each time up to that group's input, with the groups before it already
pruned; the propagation then runs it once more. Most of each of those forwards recomputes what the
previous one computed: once q/k/v have their final weights, the attention module's output depends
only on its inputs, so the o_proj, gate/up and down_proj forwards and the propagation all redo it.

:class:`Replay` keeps, per calibration batch, the inputs and output of every submodule whose
prunable linears all have their final weights (*settled*), and hands the output back when the
module is called again on that batch with equal inputs (``torch.equal`` on every tensor argument,
``==`` on plain values; any other argument type disables the replay of that call). So the result is
exactly what running the module again would give, bit for bit; only the work is skipped. Tensors
are kept by reference, not copied: each with its version counter, so one changed in place since
(an input reused by the model, an output its caller modified) no longer matches, and its entry is
retired. A kept
entry makes the entries of the modules inside it redundant, so they are dropped. Nothing is kept
for a module containing a linear that the current forward records (its hooks must fire), for a
module in training mode, or beyond the memory budget (then the module simply runs).

Plumbing only: nothing here knows an architecture. The engine (``prac.engine.loop``) says which linears
are settled (:meth:`Replay.settle`), which modules the forward records (:meth:`Replay.forwards`),
and which batch runs (:meth:`Replay.start_batch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prac.model.blocks import PRUNABLE

_PLAIN = (type(None), bool, int, float, str)
_UNSUPPORTED = object()


class _Kept:
    """A tensor kept by reference, with its version counter at the time (an in-place change since
    invalidates it); inference tensors, which have no version counter, are copied instead."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, store: torch.device):
        if tensor.is_inference():
            self.tensor, self.version = tensor.detach().to(store, copy=True), None
        else:
            self.tensor, self.version = tensor, tensor._version

    def intact(self) -> bool:
        return self.version is None or self.tensor._version == self.version


def _keep(obj: Any, store: torch.device) -> Any:
    """A module's arguments or output as kept (tensors by reference); ``_UNSUPPORTED`` for other types."""
    if isinstance(obj, torch.Tensor):
        return _Kept(obj, store)
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, (tuple, list)):
        items = [_keep(o, store) for o in obj]
        return _UNSUPPORTED if any(i is _UNSUPPORTED for i in items) else type(obj)(items)
    if isinstance(obj, dict):
        items = {k: _keep(v, store) for k, v in obj.items()}
        return _UNSUPPORTED if any(i is _UNSUPPORTED for i in items.values()) else items
    return _UNSUPPORTED


def _equal(kept: Any, now: Any) -> bool:
    """Whether the arguments ``now`` equal the kept ones (which must be intact)."""
    if isinstance(kept, _Kept):
        if not isinstance(now, torch.Tensor) or not kept.intact():
            return False
        t = kept.tensor
        return now is t or (t.shape == now.shape and t.dtype == now.dtype and torch.equal(t, now.detach().to(t.device)))
    if isinstance(kept, _PLAIN):
        return type(kept) is type(now) and kept == now
    if isinstance(kept, (tuple, list)):
        return (type(kept) is type(now) and len(kept) == len(now)
                and all(_equal(a, b) for a, b in zip(kept, now)))
    if isinstance(kept, dict):
        return isinstance(now, dict) and kept.keys() == now.keys() and all(_equal(kept[k], now[k]) for k in kept)
    return False


def _intact(kept: Any) -> bool:
    if isinstance(kept, _Kept):
        return kept.intact()
    if isinstance(kept, (tuple, list)):
        return all(_intact(o) for o in kept)
    if isinstance(kept, dict):
        return all(_intact(o) for o in kept.values())
    return True


def _give(kept: Any, device: torch.device) -> Any:
    """The kept output as the module would return it (its tensors themselves: a caller that changes
    one in place bumps its version counter, which retires the entry)."""
    if isinstance(kept, _Kept):
        return kept.tensor.to(device)
    if isinstance(kept, (tuple, list)):
        return type(kept)(_give(o, device) for o in kept)
    if isinstance(kept, dict):
        return {k: _give(v, device) for k, v in kept.items()}
    return kept


def _nbytes(obj: Any, counted: set[int]) -> int:
    if isinstance(obj, _Kept):
        if id(obj.tensor) in counted:
            return 0
        counted.add(id(obj.tensor))
        return obj.tensor.numel() * obj.tensor.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, counted) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, counted) for o in obj.values())
    return 0


class Replay:
    """Kept outputs of the submodules of one block (see the module docstring).

    ``block``: the block; ``pending``: its prunable linears whose final weights are still to come;
    ``store``: where kept tensors live; ``budget``: at most that many bytes are kept.
    """

    def __init__(self, block: nn.Module, pending: list[nn.Module], store: torch.device, budget: int):
        self.block = block
        self.store = store
        self.budget = budget
        self.batch = 0
        self.hits = 0
        self.nbytes = 0
        self.peak = 0  # the most bytes kept at once
        self._pending = {id(m) for m in pending}
        self._candidates: list[nn.Module] = [m for _, m in block.named_modules() if m is not block
                                             and any(isinstance(x, PRUNABLE) for x in m.modules())]
        self._inside = {id(m): [id(x) for x in m.modules() if x is not m] for m in self._candidates}
        self._linears = {id(m): [id(x) for x in m.modules() if isinstance(x, PRUNABLE)] for m in self._candidates}
        self._kept: dict[tuple[int, int], tuple[Any, Any, Any, int]] = {}
        self._blocked: set[int] = set()
        self._record = False

    def settle(self, linears: list[nn.Module]) -> None:
        """These linears now have their final weights."""
        self._pending -= {id(m) for m in linears}

    def _settled(self, module: nn.Module) -> bool:
        return not any(i in self._pending for i in self._linears[id(module)])

    @contextlib.contextmanager
    def forwards(self, recorded: list[nn.Module], record: bool = True) -> Iterator[None]:
        """While inside, calls of the candidate submodules replay kept outputs where they can (never
        those containing a module in ``recorded``, whose hooks must run); with ``record``, settled
        modules that ran are kept for the next forwards. Call :meth:`start_batch` before each batch."""
        ids = {id(m) for m in recorded}
        self._blocked = {id(m) for m in self._candidates
                         if id(m) in ids or any(i in ids for i in self._inside[id(m)])}
        self._record = record and not self.block.training
        originals = []
        for module in self._candidates:
            originals.append((module, module.__dict__.get("forward")))
            module.forward = self._wrap(module, module.forward)
        try:
            yield
        finally:
            for module, original in originals:
                if original is None:
                    del module.forward
                else:
                    module.forward = original

    def start_batch(self, index: int) -> None:
        """The next forward runs calibration batch ``index``."""
        self.batch = index

    def _wrap(self, module: nn.Module, forward):
        key_of = id(module)

        def replayed(*args, **kwargs):
            key = (key_of, self.batch)
            blocked = key_of in self._blocked or self.block.training
            kept = None if blocked else self._kept.get(key)
            if kept is not None:
                if _intact(kept[2]) and _equal(kept[0], args) and _equal(kept[1], kwargs):
                    self.hits += 1
                    device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                                  self.store)
                    return _give(kept[2], device)
                self.nbytes -= self._kept.pop(key)[3]  # other inputs, or an output changed in place: retired
            out = forward(*args, **kwargs)
            if self._record and not blocked and key not in self._kept and self._settled(module):
                self._keep_entry(module, key, args, kwargs, out)
            return out

        return replayed

    def _keep_entry(self, module: nn.Module, key: tuple[int, int], args, kwargs, out) -> None:
        kept_args, kept_kwargs, kept_out = _keep(args, self.store), _keep(kwargs, self.store), _keep(out, self.store)
        if any(k is _UNSUPPORTED for k in (kept_args, kept_kwargs, kept_out)):
            return
        size = _nbytes((kept_args, kept_kwargs, kept_out), set())
        inner = [k for k in ((i, key[1]) for i in self._inside[key[0]]) if k in self._kept]
        freed = sum(self._kept[k][3] for k in inner)
        if self.nbytes - freed + size > self.budget:
            return
        for k in inner:  # this entry supersedes those of the modules inside
            del self._kept[k]
        self._kept[key] = (kept_args, kept_kwargs, kept_out, size)
        self.nbytes += size - freed
        self.peak = max(self.peak, self.nbytes)

    def clear(self) -> None:
        self._kept.clear()
        self.nbytes = 0
