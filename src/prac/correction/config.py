"""Which correction runs, with what settings: :class:`CorrectionConfig`, checked against the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from prac.correction.base import Holdout, invalid
from prac.correction.registry import get_correction


@dataclass(frozen=True)
class CorrectionConfig:
    """Which correction runs and with what settings.

    ``settings``: the method's own dataclass (None: its defaults). ``exact_errors``: measure each
    layer's error before and after on the full H, and the optimum it is compared with (the
    yardstick); costs an in×in fp32 H per distinct layer input even for methods that need none.
    Without it the never-worse check runs on a stored token sample. ``seed``: token sampling and
    the held-out draw. ``holdout``: which tokens the correction is judged on (:class:`Holdout`).
    """

    method: str = "none"
    settings: Any = None
    exact_errors: bool = True
    seed: int = 0
    holdout: Holdout = Holdout()

    def __post_init__(self) -> None:
        entry = get_correction(self.method)
        if entry is None:
            if self.settings is not None:
                raise invalid("correction 'none' takes no settings")
            return
        if self.settings is None:
            object.__setattr__(self, "settings", entry.settings())
        elif not isinstance(self.settings, entry.settings):
            raise invalid(f"{self.method!r} takes {entry.settings.__name__}, got {type(self.settings).__name__}")

    @classmethod
    def of(cls, method: str, exact_errors: bool = True, seed: int = 0, holdout: Holdout | None = None,
           **settings: Any) -> CorrectionConfig:
        """A config from flat keyword settings, each checked against the method's dataclass."""
        if holdout is None:
            holdout = Holdout()
        entry = get_correction(method)
        if entry is None:
            if settings:
                raise invalid(f"correction 'none' takes no settings (got {', '.join(sorted(settings))})")
            return cls(method, None, exact_errors, seed, holdout)
        names = {f.name for f in dataclasses.fields(entry.settings)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise invalid(f"{method!r} has no setting {', '.join(unknown)} (it has {', '.join(sorted(names))})")
        return cls(method, entry.settings(**settings), exact_errors, seed, holdout)

    def replace(self, **changes: Any) -> CorrectionConfig:
        """A copy with ``changes`` applied: ``method``/``exact_errors``/``seed``/``holdout`` here, the rest
        to the method's settings (the settings are kept when the method stays the same)."""
        top = {k: changes.pop(k) for k in ("method", "exact_errors", "seed", "holdout") if k in changes}
        method = top.get("method", self.method)
        kept = dataclasses.asdict(self.settings) if self.settings is not None and method == self.method else {}
        return CorrectionConfig.of(method, top.get("exact_errors", self.exact_errors), top.get("seed", self.seed),
                                   top.get("holdout", self.holdout), **{**kept, **changes})

    @property
    def active(self) -> bool:
        return self.settings is not None
