"""ADMM: exact small cases against float64 references, and its place between the mask sources."""

import pytest
import torch

from prac.correction.objective import relative_error
from prac.methods.admm import ADMMSettings, admm_mask, gradual_sparsity, spectrum
from prac.methods.patterns import NM, Unstructured
from prac.methods.registry import METHODS, ScoreSettings
from prac.methods.sparsegpt import SparseGPTConfig
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec

from .test_correction_methods import correlated_inputs, lstsq_reference

D_IN, D_OUT = 64, 32


def group_of(x: torch.Tensor) -> InputGroup:
    stats = InputStats(x.shape[1], spec=StatsSpec(hessian=True))
    for chunk in x.split(512):
        stats.add_batch(chunk)
    return InputGroup(["layer"], stats)


@pytest.fixture(scope="module")
def layer():
    x = correlated_inputs(tokens=4096, d=D_IN, seed=2)
    w = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(5))
    return x, w


def prune(method, w, group, pattern, settings=None):
    entry = METHODS[method]
    return entry.fn(w, group, pattern, settings or entry.settings())


def test_sparsity_zero_returns_w(layer):
    x, w = layer
    result = prune("admm", w, group_of(x), Unstructured(0.0))
    assert torch.equal(result.weight, w) and not result.mask.any()


def test_frozen_mask_converges_to_the_masked_least_squares_optimum(layer):
    x, w = layer
    xd = x.double()
    h = xd.T @ xd / x.shape[0]
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    settings = ADMMSettings(iterations=100, penalty=1.0, penalty_growth=1.0, damping=0.0)
    _, z, _ = admm_mask(w.double(), spectrum(h), Unstructured(0.5), settings, frozen=mask)
    ref = lstsq_reference(x, w, ~mask)
    assert (z[mask] == 0).all()
    assert (z - ref).norm() / ref.norm() < 1e-10


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)], ids=str)
def test_layer_error_admm_le_sparsegpt_le_wanda(layer, pattern):
    x, w = layer
    h = (x.T @ x) / x.shape[0]
    errors = {}
    for method, settings in [("wanda", ScoreSettings()), ("sparsegpt", SparseGPTConfig()), ("admm", None)]:
        result = prune(method, w, group_of(x), pattern, settings)
        assert result.mask.float().mean() == pytest.approx(pattern.target_sparsity, abs=1 / D_IN)
        errors[method] = relative_error(result.weight, w, h)
    assert errors["admm"] <= errors["sparsegpt"] <= errors["wanda"], errors


def test_nm_outputs_obey_nm_and_reruns_are_bit_identical(layer):
    x, w = layer
    first = prune("admm", w, group_of(x), NM(2, 4))
    second = prune("admm", w, group_of(x), NM(2, 4))
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)
    kept = (~first.mask).reshape(D_OUT, D_IN // 4, 4).sum(-1)
    assert (kept == 2).all() and (first.weight[first.mask] == 0).all()


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_scope_row_gives_every_row_its_share(layer, scope):
    x, w = layer
    result = prune("admm", w, group_of(x), Unstructured(0.625), ADMMSettings(scope=scope))
    rows = result.mask.float().mean(dim=1)
    assert result.mask.float().mean() == pytest.approx(0.625, abs=1e-3)
    if scope == "row":
        assert torch.allclose(rows, torch.full_like(rows, 0.625))
    assert result.info["row_sparsity_min"] == pytest.approx(float(rows.min()))


def test_gradual_schedule_ramps_to_the_target():
    values = [gradual_sparsity(0.6, k, 10) for k in range(12)]
    assert values == sorted(values) and values[0] > 0 and values[9:] == [0.6] * 3
    assert gradual_sparsity(0.6, 0, 0) == 0.6


def test_one_eigendecomposition_per_group(layer):
    x, w = layer
    group = group_of(x)
    for _ in range(3):  # three linears reading one input
        prune("admm", w, group, Unstructured(0.5))
    assert group.factorisations == 2  # one eigendecomposition + one damped inverse for the final solve


def test_bad_settings_are_one_line_errors():
    from prac.core.errors import PracError

    with pytest.raises(PracError, match="iterations"):
        ADMMSettings(iterations=0)
    with pytest.raises(PracError, match="score"):
        ADMMSettings(score="best")
