"""The memory policy (prac.engine.memory): each rule's threshold on hand-made free memory, the
reconstruction budget on a hand-built block, and its one-line error on a GPU that is too small."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prac.core.errors import PracError
from prac.engine import memory
from prac.model.units import Unit

GPU = torch.device("cuda", 0)
GiB = 2**30


@pytest.fixture
def free(monkeypatch):
    """Pretend the GPU has ``free[0]`` bytes free (the driver's figure) and the allocator caches ``free[1]`` unused."""
    state = [8 * GiB, 0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state[0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state[1])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return state


def test_placed_things_take_under_half_the_free_memory(free):
    calib = torch.zeros(8, 128, dtype=torch.long)  # 1024 tokens
    per_copy = 1024 * 512 * 2  # hidden 512 in bf16
    free[0] = 4 * per_copy + 2  # two copies of one stream: just under half
    assert memory.activation_store("auto", GPU, calib, 512, torch.bfloat16) == GPU
    assert memory.activation_store("auto", GPU, calib, 512, torch.bfloat16, streams=2).type == "cpu"
    free[0] = 4 * per_copy  # exactly half: not under it
    assert memory.activation_store("auto", GPU, calib, 512, torch.bfloat16).type == "cpu"
    assert memory.activation_store("device", GPU, calib, 512, torch.bfloat16) == GPU
    assert memory.activation_store("cpu", GPU, calib, 512, torch.bfloat16).type == "cpu"
    assert memory.resident(per_copy - 1, GPU) and not memory.resident(per_copy * 2, GPU)
    assert memory.placed_whole(2 * per_copy - 1, free[0]) and not memory.placed_whole(2 * per_copy, free[0])
    # the dense stream's inputs leave the device only when they take *more* than half
    assert memory.dense_inputs_store(2 * per_copy, GPU) == GPU
    assert memory.dense_inputs_store(2 * per_copy + 1, GPU).type == "cpu"
    assert memory.dense_inputs_store(GiB**2, torch.device("cpu")).type == "cpu"


def test_caches_take_a_quarter_and_evaluation_plans_with_six_tenths(free):
    free[0] = 10 * GiB
    assert memory.replay_budget(GPU) == int(2.5 * GiB)
    assert memory.eval_batch_windows(10 * GiB, GiB) == 6


def test_the_resident_share_can_be_forced_to_zero(free, monkeypatch):
    assert memory.resident(1, GPU)
    monkeypatch.setattr(memory, "RESIDENT_SHARE", 0.0)
    assert not memory.resident(1, GPU)


def _units() -> list[Unit]:
    block = nn.ModuleDict({"up": nn.Linear(4, 8, bias=False), "down": nn.Linear(8, 4, bias=False)})
    return [Unit("up", block["up"]), Unit("down", block["down"])]


def test_the_reconstruction_budget_by_hand():
    # 64 entries; Adam: 4 (weight) + 4 (best) + 1 (mask) + 8 (state) + 2 × 4 (gradients) + 2 (bf16 cast) = 27 each;
    # 10 tokens through (4 + 8) + (8 + 4) features in bf16, doubled: 960
    assert memory.reconstruct_bytes(_units(), 10, 2, "adam") == 64 * 27 + 960
    # SGD keeps one state tensor; four batches per step: ⌊log₂ 4⌋ + 2 = 4 gradients at once
    assert memory.reconstruct_bytes(_units(), 10, 2, "sgd", batches_per_step=4) == 64 * (4 + 4 + 1 + 4 + 16 + 2) + 960


def test_reconstruction_that_does_not_fit_is_a_one_line_error(free):
    free[0], free[1] = GiB, GiB // 2  # the allocator's unused cache counts as free
    memory.check_reconstruct_fits(GiB + GiB // 2, GPU, "model.layers.3")
    with pytest.raises(PracError, match=r"^--reconstruct of model\.layers\.3 needs about 2\.00 GiB on cuda:0, "
                                        r"1\.50 GiB is free [^\n]*$"):
        memory.check_reconstruct_fits(2 * GiB, GPU, "model.layers.3")
    memory.check_reconstruct_fits(10**15, torch.device("cpu"), "model.layers.3")  # the CPU: nothing to check
