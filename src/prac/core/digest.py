"""A cheap fingerprint of tensors' exact bits, for records that say "these weights were the same".

:func:`digest` reduces each tensor on its own device to a few integer sums of its bit pattern (the
16-bit words of every element, and those weighted by the word's row and column), so it costs one
pass over the tensor and no copy of it to the host. Equal tensors (same shape, dtype and bits)
always give equal digests; a change of any bit of any element changes them (it is not a
cryptographic hash: a change built to cancel in every sum would not). Integer sums do not depend on
the order they are taken in, so the digest is the same on every device and thread count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

#: rows reduced at once: bounds the int32 copy a digest makes to about this many elements
_CHUNK = 1 << 22


def _sums(t: torch.Tensor) -> list[int]:
    """Σ of the 16-bit words of ``t``'s bits (rows: the first dimension, columns: the words of the
    rest), the same weighted by the row and by the column (1-based): three exact int64 sums."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return [0, 0, 0]
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dtype == torch.bool or t.element_size() == 1:
        words = t.view(torch.uint8)
    else:
        words = t.view(torch.int16)
    words = words.reshape(t.shape[0], -1)
    n, m = words.shape
    cols = torch.arange(1, m + 1, device=words.device, dtype=torch.int64)
    total = by_row = by_col = 0
    step = max(1, _CHUNK // max(m, 1))
    for start in range(0, n, step):
        part = words[start:start + step].to(torch.int32) & 0xFFFF  # each word as 0 .. 65535
        rows = part.sum(dim=1)  # int64
        total += int(rows.sum())
        by_row += int((rows * torch.arange(start + 1, start + part.shape[0] + 1, device=rows.device)).sum())
        by_col += int((part.sum(dim=0) * cols).sum())
    return [total, by_row, by_col]


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits for ``tensors`` in order: their shapes, dtypes and exact bits (see the module)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}|{t.dtype}|{_sums(t)};".encode())
    return h.hexdigest()[:16]
