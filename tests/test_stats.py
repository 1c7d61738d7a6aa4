"""Incremental statistics equal one-shot statistics; samples are seeded and batching-independent."""

import pytest
import torch

from prac.core.errors import PracError
from prac.model.stats import InputStats, StatsSpec


def _x(n=600, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 0.3


def test_incremental_equals_one_shot():
    x = _x()
    one = InputStats(24, spec=StatsSpec(hessian=True))
    one.add_batch(x)
    inc = InputStats(24, spec=StatsSpec(hessian=True))
    for chunk in x.split(37):
        inc.add_batch(chunk.reshape(1, -1, 24))  # leading dims are flattened
    assert inc.count == one.count == 600
    x64 = x.double()
    for stat, ref in ((inc.sum, x64.sum(0)), (inc.sumsq, (x64**2).sum(0)), (inc.hessian, x64.T @ x64)):
        torch.testing.assert_close(stat.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(inc.sumsq, one.sumsq, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(inc.hessian, one.hessian, rtol=1e-5, atol=1e-3)


def test_l2_from_sum_of_squares_equals_hessian_diagonal():
    st = InputStats(24, spec=StatsSpec(hessian=True))
    for chunk in _x().split(50):
        st.add_batch(chunk)
    rel = (st.l2 - st.hessian.diagonal().sqrt()).abs().max() / st.l2.max()
    assert rel < 1e-5


def test_samples_are_bounded_seeded_and_independent_of_batching():
    x = _x(n=1000)
    a = InputStats(24, spec=StatsSpec(max_samples=100, seed=3))
    b = InputStats(24, spec=StatsSpec(max_samples=100, seed=3))
    c = InputStats(24, spec=StatsSpec(max_samples=100, seed=4))
    a.add_batch(x)
    for chunk in x.split(10):
        b.add_batch(chunk)
        c.add_batch(chunk)
    assert a.samples.shape == (100, 24)
    # bottom-k keys: the same random keys per token in the same order -> the same rows
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(b.samples, c.samples)
    rows = {tuple(r.tolist()) for r in x}
    assert all(tuple(r.tolist()) in rows for r in a.samples)


def test_nan_statistics_name_the_layer():
    st = InputStats(4)
    st.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(PracError, match="model.layers.3.mlp.down_proj"):
        st.check_finite("model.layers.3.mlp.down_proj")
