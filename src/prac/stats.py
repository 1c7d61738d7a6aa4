"""Calibration statistics of one layer input, accumulated incrementally on the device.

One :class:`InputStats` serves every linear that reads the same input tensor (q/k/v share
one, gate/up share one). Everything is fp32 and stays on the device it was created on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prac.errors import PracError


@dataclass(frozen=True)
class StatsSpec:
    """What to collect beyond the always-on token count, sum and sum of squares."""

    hessian: bool = False
    max_samples: int = 0
    seed: int = 0

    def union(self, other: "StatsSpec") -> "StatsSpec":
        return StatsSpec(
            hessian=self.hessian or other.hessian,
            max_samples=max(self.max_samples, other.max_samples),
            seed=self.seed,
        )


class InputStats:
    """Running statistics of the rows of X (tokens x features).

    - ``count``: tokens seen; ``sum``: Σ x; ``sumsq``: Σ x² (Wanda's L2 salience, from all tokens).
    - ``hessian`` (optional): Σ x xᵀ, unnormalised, fp32.
    - ``samples`` (optional): a seeded uniform sample without replacement of at most
      ``max_samples`` token rows, kept by their largest random keys (top-k) so it is independent of batching.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", spec: StatsSpec = StatsSpec()):
        self.dim = dim
        self.spec = spec
        self.device = torch.device(device)
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float32, device=self.device)
        self.sumsq = torch.zeros(dim, dtype=torch.float32, device=self.device)
        self.hessian = (
            torch.zeros(dim, dim, dtype=torch.float32, device=self.device) if spec.hessian else None
        )
        self.samples: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        if spec.max_samples > 0:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(spec.seed)

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the token rows of ``x`` (any leading shape, last dim = features)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"input has {x.shape[-1]} features, statistics expect {self.dim}")
        rows = x.reshape(-1, self.dim).to(device=self.device, dtype=torch.float32)
        self.count += rows.shape[0]
        self.sum += rows.sum(dim=0)
        self.sumsq += rows.square().sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(rows.T, rows)
        if self._generator is not None:
            self._add_samples(rows)

    def _add_samples(self, rows: torch.Tensor) -> None:
        keys = torch.rand(rows.shape[0], generator=self._generator, device=self.device)
        if self.samples is not None:
            rows = torch.cat([self.samples, rows])
            keys = torch.cat([self._keys, keys])
        if rows.shape[0] > self.spec.max_samples:
            keep = torch.topk(keys, self.spec.max_samples, sorted=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.samples, self._keys = rows.contiguous(), keys

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over all tokens, per input feature."""
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def normalized_hessian(self) -> torch.Tensor:
        """H = XᵀX / N."""
        if self.hessian is None:
            raise RuntimeError("the Hessian was not collected for this input")
        return self.hessian / max(self.count, 1)

    def check_finite(self, name: str) -> None:
        """Raise a one-line :class:`PracError` naming ``name`` if any statistic is NaN/Inf."""
        tensors = {"sum": self.sum, "sum of squares": self.sumsq}
        if self.hessian is not None:
            tensors["Hessian"] = self.hessian
        for what, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise PracError(f"NaN/Inf in the calibration statistics ({what}) of the input to {name}")

    def nbytes(self) -> int:
        total = self.sum.nbytes + self.sumsq.nbytes
        if self.hessian is not None:
            total += self.hessian.nbytes
        if self.samples is not None:
            total += self.samples.nbytes
        return total
