"""An input group: the linears of a block that read one tensor (q/k/v, gate/up), and the work they share.

Statistics, the normalised H and every factorisation of it belong to the input, not to each
linear: :class:`InputGroup` computes each of them once, on first use, and every linear of the
group (and the correction's yardstick) reads the same copy. ``factorisations`` counts the
Cholesky attempts actually made for the group, which the tests hold to one per distinct damping.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from prac.core.linalg import DampedFactor, damped_cholesky, symmetric_inverse
from prac.model.stats import InputStats


class InputGroup:
    """The linears ``names`` (full module names, forward order) and the statistics of their input."""

    def __init__(self, names: list[str], stats: InputStats | None, device: torch.device | str = "cpu",
                 parent: InputGroup | None = None):
        self.names = list(names)
        self.stats = stats
        self.device = torch.device(device)
        self.factorisations = 0
        self.parent = parent  # the group whose held-out share this is (it counts our factorisations too)
        self._memo: dict[Hashable, Any] = {}

    @property
    def dim(self) -> int:
        if self.stats is None:
            raise RuntimeError("this group has no statistics")
        return self.stats.dim

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per group for ``key``; later calls return the same object."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def hessian(self) -> torch.Tensor:
        """``H = XᵀX / N`` (fp32, on the group's device), one copy for the whole group."""
        if self.stats is None:
            raise RuntimeError("this group has no statistics")
        return self.shared("hessian", lambda: self.stats.normalized_hessian().to(self.device))

    def factor(self, key: Hashable, build: Callable[[], DampedFactor]) -> DampedFactor:
        """A factorisation of this group's H, built once; its attempts are counted."""

        def counted() -> DampedFactor:
            result = build()
            group: InputGroup | None = self
            while group is not None:
                group.factorisations += result.attempts
                group = group.parent
            return result

        return self.shared(("factor", key), counted)

    def inverse(self, relative_damping: float) -> DampedFactor:
        """``(H + λI)⁻¹`` with ``λ = relative · mean diag H`` (one attempt; ``value`` None and a
        ``reason`` when the factorisation fails or is too ill-conditioned for fp32)."""
        h = self.hessian()

        def build() -> DampedFactor:
            return damped_cholesky(h, relative_damping, torch.diagonal(h).float().mean(), symmetric_inverse)

        return self.factor(("inverse", float(relative_damping)), build)

    def holdout(self) -> tuple[InputGroup, InputGroup] | None:
        """(fit, held-out): this group's linears on the statistics of the calibration rows outside the
        held-out sequences and of those in them (:meth:`InputStats.split`). The fit share's are this
        group's own statistics (with a held-out share they hold no held-out row), so the fit group is
        this group itself, with its H and factorisations; the held-out group is built once. None when
        nothing is held out."""

        def build():
            parts = self.stats.split() if self.stats is not None else None
            if parts is None:
                return None
            fit, held = parts
            return (self if fit is self.stats else InputGroup(self.names, fit, self.device, parent=self),
                    InputGroup(self.names, held, self.device, parent=self))

        return self.shared("holdout", build)

    def release(self) -> None:
        """Drop everything derived from the statistics (the group is done)."""
        self._memo.clear()
