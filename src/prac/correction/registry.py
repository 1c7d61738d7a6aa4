"""The correction registry: one entry per method. Adding a method = a module + a line here + its CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from prac.correction.base import LayerProblem, Proposal, invalid
from prac.stats import StatsSpec


@dataclass(frozen=True)
class Correction:
    """``settings``: the method's settings dataclass (defaults and validation inside it);
    ``stats``: ``stats(settings, exact_errors, seed) -> StatsSpec``, what the accumulators must hold;
    ``propose``: the method; ``clamps``: whether it bounds |δ| (reported as clamp counts)."""

    name: str
    settings: type
    stats: Callable[[Any, bool, int], StatsSpec]
    propose: Callable[[LayerProblem, Any], Proposal]
    description: str
    clamps: bool = False


def _registry() -> dict[str, Correction]:
    from prac.correction import diagonal, full, greedy, optimal

    return {
        "full": full.ENTRY,
        "diagonal": diagonal.ENTRY,
        "greedy": greedy.ENTRY,
        "optimal": optimal.ENTRY,
    }


_ENTRIES: dict[str, Correction] | None = None


def corrections() -> dict[str, Correction]:
    """Every registered correction by name ("none" is the absence of one)."""
    global _ENTRIES
    if _ENTRIES is None:
        _ENTRIES = _registry()
    return _ENTRIES


def names() -> tuple[str, ...]:
    return ("none", *corrections())


def get_correction(name: str) -> Correction | None:
    """The entry for ``name``; None for "none"; a one-line error for anything else."""
    if name == "none":
        return None
    entry = corrections().get(name)
    if entry is None:
        raise invalid(f"method {name!r} is not one of {', '.join(names())}")
    return entry
