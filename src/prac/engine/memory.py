"""The memory policy: every decision prac makes from the free memory of a device, in one place.

What is budgeted is memory prac allocates for a run beyond the model itself; it is budgeted against the
memory *free* at the moment of the decision — ``torch.cuda.mem_get_info`` on a GPU, the available
physical pages on the host — with one share per kind of use:

- **placed** (:data:`PLACE_SHARE`, a half): something the run needs throughout goes to the device
  when it takes under half of what is free, else it stays on the host (or streams through the
  device): the calibration activations (:func:`activation_store`), a block's dense-stream inputs
  (:func:`dense_inputs_store`), every block's weights at once (:data:`RESIDENT_SHARE`,
  :func:`resident`), the whole model in an evaluation (:func:`placed_whole`). The other half is
  what the work on it allocates;
- **cached** (:data:`CACHE_SHARE`, a quarter): what only saves work — replay's kept submodule
  outputs (:func:`replay_budget`) — takes at most a quarter of what is free where it lives;
- **planned** (:data:`EVAL_BATCH_SHARE`): the evaluation's default batch is sized to this share
  of what stays free once the weights are placed (:func:`eval_batch_windows`);
- **needed** (all of it): block-wise reconstruction has no fallback, so what it needs
  (:func:`reconstruct_bytes`) must fit in what is free, else the run stops with a one-line error
  (:func:`check_reconstruct_fits`). Here the memory PyTorch's allocator holds unused counts as free
  (it reuses it); the shares above keep the driver's figure alone, as they always have.

Nothing else in prac reads the free memory of a device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from prac.core.errors import PracError
from prac.model.units import Unit

PLACE_SHARE = 0.5
"""A thing the run needs throughout goes on the device when it takes under this share of the free memory."""

RESIDENT_SHARE = PLACE_SHARE
"""Every block's weights stay on the device when together they take under this share of its free
memory (0: always streamed, as ``tests/test_cuda_streaming.py`` forces it; :mod:`prac.engine.residency`)."""

CACHE_SHARE = 0.25
"""What only saves work (replay's kept outputs) takes at most this share of the free memory where it lives."""

EVAL_BATCH_SHARE = 0.6
"""The share of the memory left free once the weights are placed that the default evaluation batch may plan to use."""

OPTIMIZER_STATES = {"adam": 2, "rmsprop": 1, "sgd": 1}
"""fp32 tensors the size of the weights each reconstruction optimiser keeps (SGD: its momentum)."""


def free_memory(device: torch.device) -> int:
    """The memory free on ``device``: the driver's figure on a GPU, the available physical memory of
    the host on the CPU (0 where the host does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf
        return 0


def activation_store(offload: str, device: torch.device, calib: torch.Tensor, hidden: int, dtype,
                     streams: int = 1) -> torch.device:
    """Where calibration activations live: the device when two copies of each stream (its inputs and
    outputs; two streams with ``dense_target``) take under half its free memory."""
    if offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if offload == "device":
        return device
    need = 2 * streams * calib.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    return device if need < PLACE_SHARE * free_memory(device) else torch.device("cpu")


def dense_inputs_store(need: int, store: torch.device) -> torch.device:
    """Where a block's dense-stream inputs (every input group's at once, ``need`` bytes) are kept: beside
    the activations (``store``), unless that is a GPU and they take more than half its free memory."""
    if store.type == "cuda" and need > PLACE_SHARE * free_memory(store):
        return torch.device("cpu")
    return store


def replay_budget(store: torch.device) -> int:
    """Bytes :class:`prac.engine.replay.Replay` may keep: a quarter of the free memory of ``store``."""
    return int(CACHE_SHARE * free_memory(store))


def resident(weight_bytes: int, device: torch.device, share: float | None = None) -> bool:
    """Whether every block's weights (``weight_bytes`` together) stay on the GPU ``device`` for the whole
    run: under ``share`` (default :data:`RESIDENT_SHARE`) of its free memory."""
    share = RESIDENT_SHARE if share is None else share
    return weight_bytes < share * free_memory(device)


def placed_whole(weight_bytes: int, free: int) -> bool:
    """Whether an evaluation puts the whole model (``weight_bytes``) on the device rather than one block
    at a time: under half the ``free`` memory."""
    return weight_bytes < PLACE_SHARE * free


def eval_batch_windows(left: int, per_window: int) -> float:
    """How many evaluation windows of ``per_window`` bytes the memory ``left`` free after the weights
    allows (:data:`EVAL_BATCH_SHARE` of it), rounded down (the caller bounds it)."""
    return (EVAL_BATCH_SHARE * left) // per_window


def reconstruct_bytes(units: Iterable[Unit], tokens: int, dtype_bytes: int, optimizer: str,
                      batches_per_step: int = 1) -> int:
    """What block-wise reconstruction (:mod:`prac.engine.reconstruct`) of the linears ``units`` allocates
    on its device, beyond the block and the activations already there; an estimate.

    Per tuned weight entry: the fp32 weight (4 bytes), the best epoch's copy (4), the mask (1), the
    optimiser's state (4 per :data:`OPTIMIZER_STATES`), the gradients (4 each, ``⌊log₂ b⌋ + 2`` at
    once for ``b`` batches per step: the summation tree's stack and the step's total) and the weight
    cast to the block's dtype for the forward (``dtype_bytes``). Then one calibration batch's
    activations kept for the backward pass: each tuned linear's input and output for every one of
    the batch's ``tokens`` in the block's dtype, doubled for what the rest of the block keeps (norms,
    activation function, attention) and the allocator's slack.
    """
    units = list(units)
    entries = sum(u.numel for u in units)
    grads = math.floor(math.log2(max(batches_per_step, 1))) + 2
    per_entry = 4 + 4 + 1 + 4 * OPTIMIZER_STATES.get(optimizer, 2) + 4 * grads + dtype_bytes
    width = sum(u.in_features + u.out_features for u in units)
    return entries * per_entry + 2 * tokens * width * dtype_bytes


def check_reconstruct_fits(need: int, device: torch.device, block: str) -> None:
    """On a GPU: a one-line :class:`PracError` when reconstruction's ``need`` (:func:`reconstruct_bytes`)
    exceeds the free memory, the allocator's unused cache included. Nothing to check on the CPU."""
    if device.type != "cuda":
        return
    free = free_memory(device) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need > free:
        raise PracError(f"--reconstruct of {block} needs about {need / 2**30:.2f} GiB on {device}, "
                        f"{free / 2**30:.2f} GiB is free (lower --batch-size, or --reconstruct none)")
