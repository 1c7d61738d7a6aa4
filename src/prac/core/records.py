"""The typed record of one pruned linear, written by the pipeline and read by report, verify, jobs, CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    """What happened to one linear.

    ``sparsity``: fraction of its weights pruned; ``row_sparsity``: (min, max) over its output rows;
    ``relative_error``: ``‖X(W − W₀)ᵀ‖² / ‖XW₀ᵀ‖²`` on the calibration tokens when H was collected;
    ``method``: the mask source's diagnostics; ``correction``: the correction's (empty when none ran);
    ``group``: the first linear of its input group (the one whose statistics it shares).
    ``expert``: for a projection of an MoE expert, its experts module, index and projection, the
    calibration ``tokens`` routed to it, and ``prior_tokens``, how many rows of the block's tokens
    run through it topped its statistics up (0: its own tokens sufficed; docs/moe.md).
    ``quant``: the grid its survivors were rounded to and how (``sweep``), with the error before
    rounding (``error_unquantized``) where it was measured; ``relative_error`` is then after it.
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    row_sparsity: tuple[float, float]
    seconds: float
    group: str = ""
    relative_error: float | None = None
    method: dict[str, Any] = field(default_factory=dict)
    correction: dict[str, Any] = field(default_factory=dict)
    expert: dict[str, Any] | None = None
    quant: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON form (fields without a value left out)."""
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "group": self.group,
                               "sparsity": self.sparsity, "row_sparsity_min": self.row_sparsity[0],
                               "row_sparsity_max": self.row_sparsity[1], "seconds": self.seconds}
        if self.relative_error is not None:
            out["relative_error"] = self.relative_error
        if self.method:
            out["method"] = self.method
        if self.correction:
            out["correction"] = self.correction
        if self.expert is not None:
            out["expert"] = self.expert
        if self.quant:
            out["quant"] = self.quant
        return out
