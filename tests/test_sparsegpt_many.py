"""SparseGPT of the linears that read one input, swept together (q/k/v, gate/up): the same masks and
weights as pruning each alone, bit for bit, in the library and through the whole pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prac.core.errors import PracError
from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig, prune_model
from prac.methods import registry as methods
from prac.methods import sparsegpt
from prac.methods.patterns import NM, Unstructured
from prac.methods.sparsegpt import (
    CPU_JOIN_MAX_ROWS,
    SparseGPTConfig,
    joinable,
    sparsegpt_factor,
    sparsegpt_prune,
    sparsegpt_prune_many,
    worth_joining,
)
from tests.conftest import VOCAB, make_tiny_model, state_hash

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(cols: int, outs: list[int], dead: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = x + 0.3 * torch.randn(3 * cols, cols, generator=g)
    x[:, :dead] = 0.0  # inputs that never fire
    h = x.t() @ x
    weights = [torch.randn(o, cols, generator=g) for o in outs]
    return h, weights


@pytest.mark.parametrize("patterns", [
    [Unstructured(0.5)] * 3,
    [Unstructured(0.3), Unstructured(0.6), Unstructured(0.75)],  # a non-uniform allocation's sparsities
    [NM(2, 4)] * 3,
], ids=["50", "allocated", "2of4"])
@pytest.mark.parametrize("blocksize", [128, 48])
def test_one_sweep_gives_each_linear_what_it_gets_alone(patterns, blocksize):
    h, weights = _problem(192, [192, 40, 72], dead=3)
    cfg = SparseGPTConfig(blocksize=blocksize)
    factor = sparsegpt_factor(h, cfg)
    alone = [sparsegpt_prune(w, h, p, cfg, factor=factor) for w, p in zip(weights, patterns)]
    together = sparsegpt_prune_many(weights, h, patterns, cfg, factor=factor)
    for a, t, p in zip(alone, together, patterns):
        assert torch.equal(a.mask, t.mask)
        assert torch.equal(a.weight, t.weight)
        assert t.diagnostics["error_estimate"] == pytest.approx(a.diagnostics["error_estimate"], rel=1e-6)
        assert t.diagnostics["swept_with"] == 3
        # each linear its own budget (a threshold over the stacked rows would share one)
        assert abs(t.mask.float().mean().item() - p.target_sparsity) < 0.02


def test_inputs_untouched_and_reruns_bit_identical():
    h, weights = _problem(128, [64, 32])
    before = [w.clone() for w in weights]
    h0 = h.clone()
    first = sparsegpt_prune_many(weights, h, [Unstructured(0.6)] * 2)
    second = sparsegpt_prune_many(weights, h, [Unstructured(0.6)] * 2)
    assert all(torch.equal(w, b) for w, b in zip(weights, before)) and torch.equal(h, h0)
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) for a, b in zip(first, second))


def test_what_cannot_be_joined():
    assert joinable([Unstructured(0.5), Unstructured(0.7)])
    assert joinable([NM(2, 4), NM(2, 4)])
    assert not joinable([Unstructured(0.5), Unstructured(0.0)])  # sparsity 0 is a no-op alone, not a sweep
    assert not joinable([NM(2, 4), NM(4, 8)])
    assert not joinable([NM(2, 4), Unstructured(0.5)])
    h, weights = _problem(64, [32, 32])
    with pytest.raises(PracError, match="swept together"):
        sparsegpt_prune_many(weights, h, [NM(2, 4), NM(4, 8)])
    with pytest.raises(PracError, match="hessian has shape"):
        sparsegpt_prune_many([weights[0], torch.randn(8, 63)], h, [Unstructured(0.5)] * 2)


def test_on_a_cpu_only_groups_small_enough_to_gain_are_joined():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pats = [Unstructured(0.5)] * 2
    assert worth_joining(pats, [CPU_JOIN_MAX_ROWS // 2] * 2, cpu)
    assert not worth_joining(pats, [CPU_JOIN_MAX_ROWS // 2 + 1] * 2, cpu)
    assert worth_joining(pats, [14336, 14336], cuda)  # the device is only named, never used
    assert not worth_joining([Unstructured(0.5)], [64], cpu)  # one linear: nothing to join
    assert not worth_joining([NM(2, 4), NM(4, 8)], [64, 64], cuda)


def _one_by_one(monkeypatch):
    """The registry's sparsegpt without its group sweep: every linear alone, as before."""
    entry = methods.METHODS["sparsegpt"]
    monkeypatch.setitem(methods.METHODS, "sparsegpt", dataclasses.replace(entry, many=None))


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=["60", "2of4"])
def test_the_pipeline_sweeps_groups_together_with_the_same_model(arch, pattern, monkeypatch):
    calib = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(method="sparsegpt", pattern=pattern, engine=EngineConfig(batch_size=3))
    together = make_tiny_model(arch)
    outcome = prune_model(together, calib, cfg, CPU)
    swept = {r.name: r.method.get("swept_with", 1) for r in outcome.layers}
    assert any(v == 3 for k, v in swept.items() if k.endswith("q_proj"))  # q/k/v
    assert any(v == 2 for k, v in swept.items() if "mlp" in k or "expert" in k)  # gate/up (per expert)
    assert all(v == 1 for k, v in swept.items() if k.endswith(("o_proj", "down_proj")))
    _one_by_one(monkeypatch)
    alone = make_tiny_model(arch)
    prune_model(alone, calib, cfg, CPU)
    assert state_hash(together) == state_hash(alone)


def test_groups_over_the_cpu_cap_go_one_by_one(monkeypatch):
    monkeypatch.setattr(sparsegpt, "CPU_JOIN_MAX_ROWS", 8)  # the tiny model's groups are over it now
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    outcome = prune_model(make_tiny_model("mistral"), calib, PruneConfig(method="sparsegpt", pattern=Unstructured(0.5)), CPU)
    assert all("swept_with" not in r.method for r in outcome.layers)
