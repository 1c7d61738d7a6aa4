"""Sparsity patterns as explicit types instead of sentinel values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from prac.core.errors import PracError


@dataclass(frozen=True)
class Unstructured:
    """Prune ``round(sparsity * in_features)`` weights of every output row (or of the layer)."""

    sparsity: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.sparsity < 1.0):
            raise PracError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def target_sparsity(self) -> float:
        return self.sparsity

    def check(self, in_features: int, name: str = "layer") -> None:
        """Every row width works for unstructured sparsity."""

    def __str__(self) -> str:
        return f"{self.sparsity:g}"


@dataclass(frozen=True)
class NM:
    """Keep ``n`` weights in every ``m`` consecutive inputs of a row (2:4 keeps 2 of 4)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1 or self.n >= self.m:
            raise PracError(f"N:M must satisfy 1 <= N < M, got {self.n}:{self.m}")

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.m:
            raise PracError(
                f"{self.n}:{self.m} is impossible for {name}: M={self.m} does not divide in_features={in_features}"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Union[Unstructured, NM]


def parse_nm(text: str) -> NM:
    """Parse ``"2:4"`` into ``NM(2, 4)`` with a clear error for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise PracError(f"malformed N:M pattern {text!r}: expected two integers like 2:4")
    return NM(int(match.group(1)), int(match.group(2)))


def pattern_to_dict(pattern: Pattern) -> dict:
    if isinstance(pattern, NM):
        return {"type": "nm", "n": pattern.n, "m": pattern.m, "target_sparsity": pattern.target_sparsity}
    return {"type": "unstructured", "sparsity": pattern.sparsity, "target_sparsity": pattern.sparsity}
