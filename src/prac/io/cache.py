"""A small on-disk cache of dense perplexities, so a model's baseline is computed once.

The dense perplexity of a ``prac prune`` run depends only on the weights, the evaluation tokens and
the protocol (window length, dtype, device kind, metric): one JSON file per combination, named by
the sha256 of the three, under :func:`cache_dir` (``$PRAC_CACHE_DIR``, else
``$XDG_CACHE_HOME/prac``, else ``~/.cache/prac``) in ``dense_ppl/``. The weights' hash is taken over
the tensors as they are in memory (names, dtypes, shapes and bytes), so a changed weight, another
dtype or another checkpoint is a different key, never a stale hit. Hashing costs one read of the
weights (sha256 runs at roughly 1-2 GB/s: seconds for a 7B model, against minutes of evaluation).

``--no-cache`` (or ``PRAC_NO_CACHE=1``) skips it. The cache is best-effort: an unreadable or malformed entry is
a miss, and a cache folder that cannot be written only costs a warning. Entries are written atomically through
:mod:`prac.io.outputs` (temporary sibling, rename), so concurrent runs never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Bump when the perplexity computation changes in a way that changes its numbers.
PPL_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where prac keeps its caches: ``$PRAC_CACHE_DIR``, ``$XDG_CACHE_HOME/prac`` or ``~/.cache/prac``."""
    explicit = os.environ.get("PRAC_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prac"


def cache_disabled() -> bool:
    """``PRAC_NO_CACHE=1`` turns the cache off for every run, as ``--no-cache`` does for one (the test suite sets it)."""
    return os.environ.get("PRAC_NO_CACHE", "").strip().lower() in {"1", "true", "yes", "on"}


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model``: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokens_hash(ids: torch.Tensor) -> str:
    """sha256 of an integer token tensor (shape and int64 values)."""
    ids = ids.detach().to(torch.int64).cpu().contiguous()
    h = hashlib.sha256(f"{tuple(ids.shape)}|".encode())
    h.update(ids.reshape(-1).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PplKey:
    """What a dense perplexity depends on."""

    weights: str  # :func:`weights_hash`
    tokens: str  # :func:`tokens_hash` of the evaluation windows
    protocol: dict[str, Any] = field(default_factory=dict, hash=False)  # seqlen, dtype, device kind, ...

    def digest(self) -> str:
        text = json.dumps({"version": PPL_CACHE_VERSION, "weights": self.weights, "tokens": self.tokens,
                           "protocol": self.protocol}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def ppl_key(model: nn.Module, windows: torch.Tensor, device: torch.device, weights: str | None = None) -> PplKey:
    """The key of ``model``'s perplexity on ``windows`` evaluated on ``device`` (``weights``: a hash already taken)."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    protocol = {"metric": "perplexity", "seqlen": int(windows.shape[1]), "windows": int(windows.shape[0]),
                "dtype": str(dtype), "device_type": torch.device(device).type}
    return PplKey(weights or weights_hash(model), tokens_hash(windows), protocol)


class PplCache:
    """Dense perplexities on disk, one JSON file per :class:`PplKey` (see the module docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.root = (Path(root).expanduser() if root is not None else cache_dir()) / "dense_ppl"

    def path(self, key: PplKey) -> Path:
        return self.root / f"{key.digest()}.json"

    def get(self, key: PplKey) -> dict[str, Any] | None:
        """The cached result for ``key``, or None (missing, unreadable, or written for another key)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable perplexity cache entry %s: %s", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key.digest() or not isinstance(entry.get("result"), dict):
            log.warning("ignoring malformed perplexity cache entry %s", path)
            return None
        result = entry["result"]
        if not isinstance(result.get("ppl"), (int, float)):
            return None
        return result

    def put(self, key: PplKey, result: dict[str, Any], meta: dict[str, Any] | None = None) -> Path | None:
        """Store a finite ``result`` atomically; returns its path, or None when it was not stored."""
        from prac.io.outputs import write_json_atomic

        if not result.get("finite", True):
            return None  # a NaN baseline is worth recomputing (and JSON would write it as null)
        path = self.path(key)
        entry = {"key": key.digest(), "version": PPL_CACHE_VERSION, "weights": key.weights, "tokens": key.tokens,
                 "protocol": key.protocol, "result": result, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "torch": torch.__version__, **(meta or {})}
        try:
            write_json_atomic(path, entry)
        except OSError as exc:
            log.warning("could not write the perplexity cache entry %s: %s", path, exc)
            return None
        return path
