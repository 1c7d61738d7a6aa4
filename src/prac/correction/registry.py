"""The correction registry: one entry per method. Adding a method = a module + a line here: its CLI flags
come from its settings' field metadata (:mod:`prac.cli.settings_flags`; shared ones in ``base.py``)."""

from __future__ import annotations

from prac.correction.base import Correction, invalid
from prac.correction.diagonal import ENTRY as DIAGONAL
from prac.correction.full import ENTRY as FULL
from prac.correction.greedy import ENTRY as GREEDY
from prac.correction.optimal import ENTRY as OPTIMAL


def _registry() -> dict[str, Correction]:
    return {
        "full": FULL,
        "diagonal": DIAGONAL,
        "greedy": GREEDY,
        "optimal": OPTIMAL,
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
