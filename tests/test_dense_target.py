"""``--dense-target``: every layer reconstructs the dense model's output from its inputs in the pruned model."""

import copy

import pytest
import torch

from prac.engine.config import EngineConfig
from prac.engine.loop import BlockEngine
from prac.engine.pipeline import PruneConfig, dense_target_weight, prune_model, stats_spec_for
from prac.methods.patterns import Unstructured
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec

from .conftest import make_tiny_model, state_hash

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))


def test_target_weight_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    n, din, dout = 400, 12, 5
    xd = torch.randn(n, din, generator=g, dtype=torch.float64) @ torch.randn(din, din, generator=g, dtype=torch.float64)
    x = xd + 0.3 * torch.randn(n, din, generator=g, dtype=torch.float64)  # the pruned model's drifted inputs
    w0 = torch.randn(dout, din, generator=g, dtype=torch.float64)
    stats = InputStats(din, CPU, StatsSpec(hessian=True, drift=True))
    for part, dpart in zip(x.split(100), xd.split(100)):
        stats.add_batch(part.float())
        stats.add_drift(dpart.float(), part.float())
    group = InputGroup(["lin"], stats, CPU)
    got = dense_target_weight(w0.float(), group, damping=1e-2)
    h = x.T @ x / n
    lam = 1e-2 * float(torch.diagonal(h).mean())
    # min ‖X Wᵀ − X_d W₀ᵀ‖²/N + λ‖W − W₀‖², solved as a stacked least-squares problem in float64
    a = torch.cat([x / n ** 0.5, lam ** 0.5 * torch.eye(din, dtype=torch.float64)])
    b = torch.cat([xd @ w0.T / n ** 0.5, lam ** 0.5 * w0.T])
    expected = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(got.double(), expected, rtol=1e-3, atol=1e-4), (got.double() - expected).abs().max()
    assert group.factorisations == 1
    dense_target_weight(w0.float(), group, damping=1e-2)
    assert group.factorisations == 1  # the shift is computed once per group


def test_spec_and_engine_pairing(calib):
    """Block 0's first group sees the same tokens in both streams: the drift Σ (x_d − x) xᵀ is exactly
    zero there; later groups (after pruned q/k/v) and later blocks see it."""
    cfg = PruneConfig(method="wanda", pattern=Unstructured(0.7), engine=EngineConfig(batch_size=4, dense_target=True))
    spec = stats_spec_for(cfg)
    assert spec.drift and spec.hessian
    seen = {}
    prune_model(make_tiny_model("mistral"), calib, cfg, CPU,
                observer=lambda grp: seen.setdefault(grp.names[0],
                                                     (grp.stats.drift, grp.stats.drift_out, grp.stats.hessian)))
    drift, _, h = seen["model.layers.0.self_attn.q_proj"]
    assert not bool(drift.any())
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"):
        drift, per_linear, h = seen[name]
        assert per_linear is None and float(drift.norm()) > 1e-3 * float(h.norm()), name
    # down_proj (64 outputs < 128 inputs): the drift is kept as W₀ D, [out, in], for that linear only
    drift, per_linear, h = seen["model.layers.0.mlp.down_proj"]
    assert drift is None and list(per_linear) == ["model.layers.0.mlp.down_proj"]
    assert per_linear["model.layers.0.mlp.down_proj"].shape == (64, 128)
    assert bool(per_linear["model.layers.0.mlp.down_proj"].any())


def test_per_linear_drift_gives_the_same_target():
    """W₀ D kept per linear (for groups with fewer outputs than inputs) gives the W* of the full D."""
    g = torch.Generator().manual_seed(3)
    n, din = 600, 24
    xd = torch.randn(n, din, generator=g) @ torch.randn(din, din, generator=g)
    x = xd + 0.2 * torch.randn(n, din, generator=g)
    weights = {"a": torch.randn(5, din, generator=g), "b": torch.randn(3, din, generator=g)}
    full, per = (InputStats(din, CPU, StatsSpec(hessian=True, drift=True)) for _ in range(2))
    per.drift_per_linear({k: w.shape[0] for k, w in weights.items()})
    for part, dpart in zip(x.split(150), xd.split(150)):
        for stats, project in ((full, None), (per, weights)):
            stats.add_batch(part)
            stats.add_drift(dpart, part, project)
    assert per.drift is None and full.drift_out is None
    for name, w in weights.items():
        expected = dense_target_weight(w, InputGroup(["a", "b"], full, CPU), 1e-2)
        got = dense_target_weight(w, InputGroup(["a", "b"], per, CPU), 1e-2, name)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    with pytest.raises(RuntimeError, match="no drift product"):
        dense_target_weight(weights["a"], InputGroup(["a", "b"], per, CPU), 1e-2, "c")


def test_nothing_pruned_leaves_the_model_unchanged(calib):
    model = make_tiny_model("mistral")
    before = state_hash(model)
    prune_model(model, calib, PruneConfig(method="sparsegpt", pattern=Unstructured(0.0),
                                          engine=EngineConfig(batch_size=4, dense_target=True)), CPU)
    assert state_hash(model) == before


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_dense_target_brings_the_output_closer_to_the_dense_model(calib, method):
    """In-sample, the last block's outputs are closer to the dense model's; reruns are bit-identical."""
    base = make_tiny_model("mistral")
    dense_cfg = PruneConfig(pattern=Unstructured(0.0), engine=EngineConfig(batch_size=4))
    dense = prune_model(copy.deepcopy(base), calib, dense_cfg, CPU, return_hidden=True).final_hidden

    def run(dense_target):
        model = copy.deepcopy(base)
        cfg = PruneConfig(method=method, pattern=Unstructured(0.7),
                          engine=EngineConfig(batch_size=4, dense_target=dense_target))
        out = prune_model(model, calib, cfg, CPU, return_hidden=True)
        err = sum(float((a - b).square().sum()) for a, b in zip(out.final_hidden, dense))
        return err / sum(float(b.square().sum()) for b in dense), state_hash(model), out

    plain, _, _ = run(False)
    target, digest, out = run(True)
    again, digest2, _ = run(True)
    assert target < 0.8 * plain, (target, plain)
    assert digest == digest2 and target == again
    assert all(r.sparsity == pytest.approx(0.7, abs=1e-3) for r in out.layers)


def test_engine_needs_the_drift_statistics(calib):
    engine = BlockEngine(EngineConfig(dense_target=True), CPU)
    with pytest.raises(RuntimeError, match="drift"):
        engine.run(make_tiny_model("mistral"), calib, StatsSpec(hessian=True), lambda group, units: None)


@pytest.mark.parametrize("arch", ["qwen2", "opt", "gpt_neox", "gpt2", "bert"])
def test_every_architecture(calib, arch):
    """Biases, transposed Conv1D weights, encoders: the dense stream pairs the same tokens and helps in-sample."""
    base = make_tiny_model(arch)
    engine = EngineConfig(batch_size=4)
    dense = prune_model(copy.deepcopy(base), calib, PruneConfig(pattern=Unstructured(0.0), engine=engine), CPU,
                        return_hidden=True).final_hidden
    errors = []
    for dense_target in (False, True):
        cfg = PruneConfig(method="sparsegpt", pattern=Unstructured(0.7),
                          engine=EngineConfig(batch_size=4, dense_target=dense_target))
        out = prune_model(copy.deepcopy(base), calib, cfg, CPU, return_hidden=True)
        assert all(r.sparsity == pytest.approx(0.7, abs=2e-2) for r in out.layers)
        errors.append(sum(float((a - b).square().sum()) for a, b in zip(out.final_hidden, dense)))
    assert errors[1] < errors[0], errors
