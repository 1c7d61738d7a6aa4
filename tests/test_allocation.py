"""Sparsity allocators: identical statistics give the uniform plan; every plan meets the total."""

import copy

import pytest
import torch

from prac.core.errors import PracError
from prac.engine.pipeline import PruneConfig, prune_model
from prac.jobs.allocation import AllocationConfig, allocate
from prac.methods.patterns import Unstructured

from .conftest import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["owl", "error"])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.333])
def test_every_plan_meets_the_total_exactly(calib, method, target):
    plan = allocate(make_tiny_model("mistral"), calib, target, AllocationConfig(method=method))
    total = sum(plan.numel.values())
    pruned = sum(round(plan.sparsity[k] * plan.numel[k]) for k in plan.numel)
    assert pruned == round(target * total)
    assert all(0 <= s <= 0.95 for s in plan.sparsity.values())


def test_identical_statistics_give_the_uniform_plan():
    """Linears with identical statistics (OWL: the same outlier ratio; error: the same curve) get the
    target sparsity, up to the one weight per layer that makes the total exact."""
    from prac.jobs import allocation

    names = [f"model.layers.{b}.{p}" for b in range(3) for p in ("q", "k", "mlp")]
    numel = {k: 4096 for k in names}
    block_of = {k: int(k.split(".")[2]) for k in names}
    ratios = {k: (40, 4096) for k in names}
    curves = {k: [(s, (s / 0.9) ** 2) for s in (0.4, 0.5, 0.6, 0.7, 0.8)] for k in names}
    for plan in (allocation._owl_plan(0.6, AllocationConfig(method="owl"), ratios, numel, block_of),
                 allocation._error_plan(0.6, AllocationConfig(method="error"), curves, numel, block_of)):
        assert all(abs(s - 0.6) <= 1 / 4096 for s in plan.sparsity.values()), plan.sparsity
        assert sum(round(s * 4096) for s in plan.sparsity.values()) == round(0.6 * 4096 * len(names))


def test_owl_gives_outlier_heavy_blocks_less_sparsity(calib):
    model = make_tiny_model("mistral")
    with torch.no_grad():  # block 1 gets a few huge weights: many Wanda-score outliers
        model.model.layers[1].mlp.down_proj.weight[:, :4] *= 50
    plan = allocate(model, calib, 0.5, AllocationConfig(method="owl"))
    s0 = plan.sparsity["model.layers.0.mlp.down_proj"]
    s1 = plan.sparsity["model.layers.1.mlp.down_proj"]
    assert s1 < 0.5 < s0 and s0 - s1 == pytest.approx(2 * 0.08, abs=0.01)


def test_plan_drives_the_pruning_run(calib):
    model = make_tiny_model("mistral")
    plan = allocate(model, calib, 0.6, AllocationConfig(method="error"))
    outcome = prune_model(copy.deepcopy(model), calib, PruneConfig(pattern=Unstructured(0.6), plan=plan.sparsity), CPU)
    realised = {r.name: r.sparsity for r in outcome.layers}
    for name, s in plan.sparsity.items():
        assert realised[name] == pytest.approx(s, abs=1 / 64)  # row rounding only


def test_bad_allocation_is_a_one_line_error():
    with pytest.raises(PracError, match="unknown allocation"):
        AllocationConfig(method="dlp")


def test_scan_samples_reads_only_the_first_sequences(calib):
    model = make_tiny_model("mistral")
    short = allocate(model, calib, 0.6, AllocationConfig(method="error", scan_samples=2))
    assert short.sparsity == allocate(model, calib[:2], 0.6, AllocationConfig(method="error")).sparsity
    assert short.sparsity != allocate(model, calib, 0.6, AllocationConfig(method="error", scan_samples=0)).sparsity
    assert AllocationConfig(method="error").scan == 16 and AllocationConfig(method="owl").scan == 0
    assert short.to_dict()["detail"]["scan_sequences"] == 2
    with pytest.raises(PracError, match="scan samples"):
        AllocationConfig(method="error", scan_samples=-1)


def test_allocation_samples_needs_a_scanning_allocator(capsys):
    from prac.cli import main

    assert main(["prune", "--allocation-samples", "4", "--eval", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "--allocation-samples needs --allocation owl or error" in err[0]


def test_the_scan_is_dense_whatever_the_pruning_engine(calib):
    """The pruning run's ``dense_target``/``sequential`` do not change the dense scan (nor its plan)."""
    from prac.engine.config import EngineConfig

    model = make_tiny_model("mistral")
    plain = allocate(model, calib, 0.6, AllocationConfig(method="error"))
    other = allocate(model, calib, 0.6, AllocationConfig(method="error"),
                     engine=EngineConfig(dense_target=True, sequential=True))
    assert plain.sparsity == other.sparsity
    cfg = PruneConfig(method="admm", pattern=Unstructured(0.6), plan=other.sparsity,
                      engine=EngineConfig(dense_target=True))
    outcome = prune_model(copy.deepcopy(model), calib, cfg, CPU)
    assert sum(r.sparsity * r.shape[0] * r.shape[1] for r in outcome.layers) == pytest.approx(
        0.6 * sum(r.shape[0] * r.shape[1] for r in outcome.layers), rel=1e-3)
