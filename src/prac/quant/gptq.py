"""Weight quantization on the pruned weights, in the same column sweep as SparseGPT (``--wbits``).

The grid is compressed-tensors' (the format vLLM serves): integer ``bits``, a scale (and with
``symmetric=False`` a zero point) per output row and group of ``group_size`` consecutive inputs
(``-1``: one group per row), from the group's min and max (``calculate_qparams``), values rounded by
its ``fake_quantize``. So what prac evaluates is what the saved checkpoint dequantizes to.

Two ways to reach the grid, both OBS/GPTQ column sweeps over the input's ``(H + λI)⁻¹ = UᵀU``
(``prac.methods.sparsegpt``'s factor):

- **joint** (``--method sparsegpt``): each column is pruned *and* its survivors rounded in one step;
  the pruning and rounding error of the column is carried to the later columns (SparseGPT's joint
  sparsification and quantization, its reference code's ``--wbits``);
- **on a fixed mask** (every other mask source, after a correction): :func:`gptq_on_mask` rounds the
  survivors column by column and carries each column's rounding error onto *every* later weight,
  pruned ones included; a pruned weight is set back to zero when the sweep reaches its column, and
  what it had received is carried on like any other error (SparseGPT/GPTQ's sweep on a fixed mask).
  Pruned weights end exactly zero. With sparsity 0 this is plain GPTQ.

Group parameters are computed when the sweep reaches the group's first column, from the weights
as updated so far (GPTQ's rule; on a fixed mask from the group's survivors only), which needs the
group to lie in one column block or to start on a block boundary: ``group_size`` must divide the
block or be a multiple of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prac.core.errors import PracError

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    """``bits`` (0: no quantization), ``group_size`` (inputs per scale; -1: per output channel),
    ``symmetric`` grid (zero point 0) or asymmetric (an integer zero point per group)."""

    bits: int = 0
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits and self.bits not in BITS:
            raise PracError(f"--wbits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise PracError(f"--groupsize must be -1 (per channel) or >= 1, got {self.group_size}")

    @property
    def active(self) -> bool:
        return self.bits > 0

    def check(self, in_features: int, name: str) -> None:
        """A group size that does not divide a layer's inputs is a one-line error (before any work)."""
        if self.active and self.group_size != -1 and in_features % self.group_size:
            raise PracError(f"--groupsize {self.group_size} does not divide the {in_features} inputs of {name}")

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def args(self):
        """compressed-tensors' ``QuantizationArgs`` of this grid (group or channel strategy)."""
        from compressed_tensors.quantization import QuantizationArgs

        if self.group_size == -1:
            return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel")
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="group",
                                group_size=self.group_size)

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


class ColumnQuantizer:
    """Rounds one column at a time to the grid of its group (layout ``wt`` = Wᵀ, a row per input).
    ``scales``/``zero_points``: ``[out, groups]`` as the sweep set them; ``dtype``: the model's, in
    which scales are stored (they are rounded to it before use, so the saved grid is this one)."""

    def __init__(self, cfg: QuantConfig, in_features: int, out_features: int, dtype: torch.dtype, device):
        from compressed_tensors.quantization import QuantizationArgs

        self.cfg, self.dtype = cfg, dtype
        self.group = cfg.group(in_features)
        groups = in_features // self.group
        self.args = cfg.args()
        self.column_args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="channel")
        self.scales = torch.zeros(out_features, groups, dtype=torch.float32, device=device)
        self.zero_points = torch.zeros(out_features, groups, dtype=torch.float32, device=device)

    def cpu(self) -> ColumnQuantizer:
        """This grid with its scales and zero points on the CPU (to keep, gather or save)."""
        self.scales, self.zero_points = self.scales.cpu(), self.zero_points.cpu()
        return self

    def starts_group(self, column: int) -> bool:
        return column % self.group == 0

    def set_group(self, column: int, rows: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Grid of the group starting at input ``column`` from its weights ``rows`` ([group, out], Wᵀ);
        with ``keep`` (same shape, True = survivor) from the survivors only. The others are read as
        0, which never moves the range: ``calculate_qparams`` always widens it to hold 0."""
        from compressed_tensors.quantization.utils.helpers import calculate_qparams

        g = column // self.group
        if keep is not None:
            rows = rows.masked_fill(~keep, 0.0)
        scale, zero = calculate_qparams(rows.amin(dim=0), rows.amax(dim=0), self.args)
        self.scales[:, g] = scale.reshape(-1).to(self.dtype).float()
        self.zero_points[:, g] = zero.reshape(-1).float()

    def __call__(self, column: int, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one input's weights over the outputs) on the grid of its group."""
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        g = column // self.group
        return fake_quantize(values.unsqueeze(1), self.scales[:, g:g + 1], self.zero_points[:, g:g + 1],
                             self.column_args).squeeze(1)


def check_blocks(cfg: QuantConfig, blocksize: int, in_features: int) -> None:
    group = cfg.group(in_features)
    if group % blocksize and blocksize % group:
        raise PracError(f"--groupsize {group} and the sweep's --blocksize {blocksize} must divide one another")


QuantFn = Callable[[int, torch.Tensor], torch.Tensor]


def gptq_on_mask(weight: torch.Tensor, mask: torch.Tensor, upper: torch.Tensor, cfg: QuantConfig,
                 dtype: torch.dtype, blocksize: int = 128) -> tuple[torch.Tensor, ColumnQuantizer, float]:
    """Round the survivors of ``weight`` [out, in] (zeros where ``mask``) to ``cfg``'s grid, column by
    column, through ``upper`` (U with (H + λI)⁻¹ = UᵀU): each column's error ``(w - q) / U_jj`` is
    carried onto every later weight, pruned ones included, and a pruned weight's ``q`` is 0 when its
    own column is reached (SparseGPT's OBS step with a fixed mask), so no compensation is dropped.
    Each group's grid is set from its survivors only. Returns the weights (exactly zero where
    ``mask``, the rest on the grid), the grid and Σ err² (the sweep's OBS loss, ×2)."""
    rows, cols = weight.shape
    check_blocks(cfg, blocksize, cols)
    quant = ColumnQuantizer(cfg, cols, rows, dtype, weight.device)
    wt = weight.detach().float().t().contiguous()
    keep = ~mask.t()
    diag = upper.diagonal()
    total = torch.zeros((), device=weight.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if quant.starts_group(i1) and quant.group >= i2 - i1:  # the group spans the block: set it before
            quant.set_group(i1, wt[i1:i1 + quant.group], keep[i1:i1 + quant.group])
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if quant.starts_group(column) and quant.group < i2 - i1:  # groups inside the block: as reached
                quant.set_group(column, w1[i:i + quant.group], keep[column:column + quant.group])
            q = torch.where(keep[column], quant(column, w1[i]), 0.0)
            err = (w1[i] - q) / diag[column]
            err1[i] = err
            w1[i] = q
            if i + 1 < i2 - i1:  # onto every later weight: a pruned one passes it on when zeroed
                w1[i + 1:].addmm_(u1[i, i + 1:].unsqueeze(1), err.unsqueeze(0), alpha=-1)
        wt[i1:i2] = w1
        total += err1.square().sum()
        if i2 < cols:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1)
    return wt.t().contiguous(), quant, float(total)


def on_grid(weight: torch.Tensor, quant: ColumnQuantizer) -> bool:
    """Whether every weight equals its own rounding to its group's grid (what a saved checkpoint keeps)."""
    cols = weight.shape[1]
    return all(torch.equal(quant(c, weight[:, c]), weight[:, c]) for c in range(cols))


def saved_bytes(numel: int, out_features: int, in_features: int, cfg: QuantConfig, scale_bytes: int) -> int:
    """Bytes a pack-quantized linear takes: packed integers, scales (and zero points)."""
    groups = in_features // cfg.group(in_features)
    params = out_features * groups * (scale_bytes + (0 if cfg.symmetric else 1))
    return math.ceil(numel * cfg.bits / 8) + params


def summarize_quantization(layers: list, cfg: QuantConfig) -> dict[str, Any]:
    """The report's ``quantization``: the grid, how many linears took it by which sweep, and the
    mean relative layer error before rounding where it was measured (the GPTQ pass on a mask; a joint
    sweep has no unrounded state of the same weights) next to the mean after it."""
    quantized = [rec for rec in layers if rec.quant]
    sweeps: dict[str, int] = {}
    for rec in quantized:
        sweeps[rec.quant.get("sweep", "?")] = sweeps.get(rec.quant.get("sweep", "?"), 0) + 1
    out: dict[str, Any] = {**cfg.describe(), "quantized_layers": len(quantized), "sweeps": sweeps}
    before = [rec.quant["error_unquantized"] for rec in quantized if rec.quant.get("error_unquantized") is not None]
    if before:
        out["mean_relative_error_unquantized"] = sum(before) / len(before)
    after = [rec.relative_error for rec in quantized if rec.relative_error is not None]
    if after:
        out["mean_relative_error"] = sum(after) / len(after)
    return out
