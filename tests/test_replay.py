"""Replay (``prac.engine.replay``): a sequential calibration reuses the outputs of final submodules, exactly."""

import copy
import logging

import pytest
import torch
from torch import nn

from prac.engine.config import EngineConfig
from prac.engine.loop import BlockEngine
from prac.engine.pipeline import PruneConfig, prune_model
from prac.engine.replay import Replay
from prac.methods.patterns import Unstructured
from prac.model.stats import StatsSpec

from .conftest import make_tiny_model, state_hash

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))


class Counting(nn.Module):
    """A linear that counts its forwards and can add its input to its output in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return self.lin(x) * scale


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Counting(), Counting()

    def forward(self, x):
        return self.second(self.first(x))


def test_replay_returns_the_kept_output_only_for_equal_inputs_and_settled_modules():
    torch.manual_seed(0)
    block = Pair().eval()
    replay = Replay(block, [block.first.lin, block.second.lin], CPU, budget=1 << 20)
    x = torch.randn(3, 4)
    with replay.forwards([]), torch.no_grad():
        replay.start_batch(0)
        block(x)
    assert replay.nbytes == 0  # nothing is settled: nothing kept
    replay.settle([block.first.lin])
    with replay.forwards([]), torch.no_grad():
        replay.start_batch(0)
        expected = block(x)
        calls = block.first.calls
        replay.start_batch(0)
        again = block(x)
        assert block.first.calls == calls and replay.hits == 1  # first replayed, second (unsettled) ran
        assert torch.equal(again, expected)
        replay.start_batch(0)
        block(x + 1)  # other inputs: runs
        assert block.first.calls == calls + 1
        replay.start_batch(1)
        block(x)  # another batch: runs
        assert block.first.calls == calls + 2
    with replay.forwards([block.first.lin]), torch.no_grad():  # a recorded linear inside: never replayed
        replay.start_batch(0)
        block(x)
        assert block.first.calls == calls + 3


def test_kept_outputs_survive_in_place_changes_and_the_budget_is_respected():
    torch.manual_seed(0)
    block = nn.Sequential(Pair()).eval()
    x = torch.randn(3, 4)
    replay = Replay(block, [], CPU, budget=1 << 20)
    with replay.forwards([]), torch.no_grad():
        replay.start_batch(0)
        expected = block(x).clone()
        replay.start_batch(0)
        block(x).add_(100.0)  # the caller modifies what it got: the entry is retired, the pair runs again
        calls = block[0].first.calls
        replay.start_batch(0)
        assert torch.equal(block(x), expected)
        assert replay.hits == 1 and block[0].first.calls == calls + 1
        replay.start_batch(0)
        assert torch.equal(block(x), expected) and replay.hits == 2
        # the pair's input and output kept; the entries of the modules inside it were dropped
        assert replay.nbytes == 2 * x.numel() * x.element_size()
        x.mul_(1.0)  # an input changed in place (even to the same values): no longer matched
        replay.start_batch(0)
        block(x)
        assert replay.hits == 2
    small = Replay(block, [], CPU, budget=0)
    with small.forwards([]), torch.no_grad():
        for _ in range(2):
            small.start_batch(0)
            block(x)
    assert small.hits == 0 and small.nbytes == 0


class Opaque:
    """An argument type replay does not know how to compare."""

    def __rmul__(self, other):
        return other * 2.0


def test_unknown_arguments_and_training_mode_are_never_replayed():
    torch.manual_seed(0)
    outer = nn.Sequential(Counting()).eval()
    block = outer[0]
    replay = Replay(outer, [], CPU, budget=1 << 20)
    x = torch.randn(2, 4)
    with replay.forwards([]), torch.no_grad():
        for _ in range(2):
            replay.start_batch(0)
            block(x, scale=Opaque())
    assert block.calls == 2 and replay.hits == 1  # only the linear inside it, called on a tensor alone
    outer.train()
    with replay.forwards([]), torch.no_grad():
        for _ in range(2):
            replay.start_batch(0)
            block(x, scale=2.0)
    assert block.calls == 4 and replay.hits == 1


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "opt", "gpt_neox", "gpt2", "bert"])
@pytest.mark.parametrize("dense_target", [False, True])
def test_replay_gives_bit_identical_models(calib, arch, dense_target, caplog):
    """Sequential runs with and without replay: the same weights and final hidden states, bit for bit
    (and the replay did answer calls)."""
    base = make_tiny_model(arch)
    runs = {}
    for replay in (False, True):
        model = copy.deepcopy(base)
        engine = EngineConfig(batch_size=3, sequential=True, dense_target=dense_target, replay=replay)
        with caplog.at_level(logging.INFO, logger="prac.engine.loop"):
            caplog.clear()
            out = prune_model(model, calib, PruneConfig(method="sparsegpt", pattern=Unstructured(0.6), engine=engine),
                              CPU, return_hidden=True)
        hits = sum(int(m.split()[1]) for m in caplog.messages if m.startswith("replay:"))
        assert (hits > 0) == replay, hits
        runs[replay] = state_hash(model), torch.cat(out.final_hidden)
    assert runs[False][0] == runs[True][0]
    assert torch.equal(runs[False][1], runs[True][1])


def test_replay_answers_the_attention_and_gate_up_calls_of_later_forwards(calib):
    """Mistral, 3 batches: o_proj's forward reuses q/k/v, down_proj's the attention, the propagation
    the attention and gate/up: 7 calls per batch and block (4 in the last, not propagated)."""
    model = make_tiny_model("mistral")
    engine = BlockEngine(EngineConfig(batch_size=3, sequential=True), CPU)

    def keep(group, linears):
        return {n: linears[n].weight.detach().float().clone() for n in group.names}

    outcome = engine.run(model, calib, StatsSpec(hessian=True), keep)
    assert outcome.replayed == 3 * (7 + 4)
    plain = BlockEngine(EngineConfig(batch_size=3, sequential=False), CPU).run(make_tiny_model("mistral"), calib,
                                                                                StatsSpec(hessian=True), keep)
    assert plain.replayed == 0
