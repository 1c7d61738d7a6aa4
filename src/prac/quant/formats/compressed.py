"""Saving a quantized model in compressed-tensors' format (``--save-format compressed``).

The format is the library's, not prac's: :func:`to_compressed` attaches compressed-tensors'
quantization scheme to every linear prac quantized (``apply_quantization_config``), sets each one's
``weight_scale`` (and ``weight_zero_point``) to the grid prac's sweep chose, and lets the library's
``ModelCompressor`` pack the integers (``pack-quantized``, what vLLM serves as W4A16/W8A16). The
weights are already on those grids, so packing loses nothing: transformers' ``from_pretrained``
gives back prac's in-memory logits (tested).

The config has **no** ``sparsity_config`` (current vLLM rejects one; compressed-tensors dropped its
sparse formats): the zeros are stored as quantized zeros.

Not supported, refused before any work (:func:`check_compressed`): fused MoE experts (3D
parameters, not ``nn.Linear``: the library's schemes target linears) and asymmetric grids
(pack-quantized packs the zero points, which transformers' loader then cannot read back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prac.core.errors import PracError
from prac.quant.gptq import ColumnQuantizer, QuantConfig

if TYPE_CHECKING:
    from prac.model.units import Unit

FORMAT = "pack-quantized"


def check_compressed(quant: QuantConfig, units: Mapping[str, Unit]) -> None:
    """Refuse (one line, before any work) a compressed save that the format cannot hold."""
    if not quant.active:
        raise PracError("--save-format compressed stores quantized weights: give --wbits too "
                        "(compressed-tensors has no sparse-only format that serving stacks load)")
    if not quant.symmetric:
        raise PracError("--save-format compressed needs a symmetric grid: transformers cannot load the packed "
                        "zero points of an asymmetric pack-quantized folder; drop --asym or save dense")
    for name, unit in units.items():
        if unit.kind == "expert":
            raise PracError(f"--save-format compressed cannot hold fused MoE experts ({name.rsplit('.', 2)[0]}: 3D "
                            f"tensors, not linears); use --save-format dense")
        if unit.kind != "linear":
            raise PracError(f"--save-format compressed holds nn.Linear layers only; {name} is a {unit.kind}; "
                            f"use --save-format dense")


def to_compressed(model: nn.Module, grids: Mapping[str, ColumnQuantizer], quant: QuantConfig) -> Any:
    """Attach the scheme and prac's grids to ``model`` and pack its quantized linears in place.

    Returns the library's ``ModelCompressor``; call its ``update_config(folder)`` after
    ``save_pretrained(folder)``. The model is compressed afterwards (the library decompresses it on
    its next forward)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    modules = dict(model.named_modules())
    missing = sorted(n for n in grids if not isinstance(modules.get(n), nn.Linear))
    if missing:
        raise PracError(f"--save-format compressed: {missing[0]} is not a linear layer")
    ignore = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in grids]
    scheme = QuantizationScheme(targets=["Linear"], weights=quant.args())
    with _one_process():
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore),
                                  show_progress=False)
        with torch.no_grad():
            for name, grid in grids.items():
                module = modules[name]
                module.weight_scale.copy_(grid.scales.to(module.weight_scale))
                module.weight_zero_point.copy_(grid.zero_points.to(module.weight_zero_point))
                module.quantization_status = QuantizationStatus.FROZEN
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
        compressor.compress_model(model)
    return compressor


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """The library's own work in this process alone: under torchrun only rank 0 saves, and the
    library would otherwise split the modules across the ranks and wait for the others (a hang)."""
    from compressed_tensors.offload.utils import as_single_threaded

    with as_single_threaded():
        yield


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
