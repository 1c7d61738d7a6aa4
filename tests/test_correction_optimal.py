"""The ``optimal`` solver (Schur-complement CG) against float64 per-row exact solves, and its fallbacks."""

import logging
import math

import pytest
import torch

import prac.correction.optimal as optimal
from prac.correction.optimal import masked_pcg, optimal_delta
from prac.methods.masks import apply_mask, mask_from_scores, wanda_scores
from prac.methods.patterns import NM, Unstructured

D_IN, D_OUT, TOKENS = 128, 32, 512


def ill_conditioned_layer(pattern, d_in=D_IN, tokens=TOKENS, seed=0):
    """The layer-speed benchmark's activations at small size: a rank-16 mixing shared by all features,
    isotropic noise and log-normal per-feature scales (outlier channels); Wanda mask. H = XᵀX / N."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, 16, generator=g) / 4.0
    x = torch.randn(tokens, 16, generator=g) @ mixing.T + 0.3 * torch.randn(tokens, d_in, generator=g)
    x *= torch.exp(0.7 * torch.randn(d_in, generator=g))
    w = torch.randn(D_OUT, d_in, generator=g) / math.sqrt(d_in)
    h = x.T @ x / tokens
    mask = mask_from_scores(wanda_scores(w, x.square().sum(0).sqrt()), pattern)
    return w, apply_mask(w, mask), mask, h


def exact_delta(w, wp, free, h, lam):
    """float64, one row at a time: δ_F = (H_FF + λI)⁻¹ (H d)_F."""
    hd = h.double()
    a = hd + lam * torch.eye(h.shape[0], dtype=torch.float64)
    b = (w - wp).double() @ hd
    out = torch.zeros(w.shape, dtype=torch.float64)
    for i in range(w.shape[0]):
        f = free[i].nonzero().flatten()
        out[i, f] = torch.linalg.solve(a[f][:, f], b[i, f])
    return out


def objective(delta, w, wp, h):
    e = (w - wp).double() - delta.double()
    return float(((e @ h.double()) * e).sum())


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=["50%", "2:4"])
@pytest.mark.parametrize("damping, tol", [(1e-2, 1e-4), (1e-5, 1e-4)])
def test_matches_float64_exact_solve_in_few_iterations(pattern, damping, tol):
    w, wp, mask, h = ill_conditioned_layer(pattern)
    eig = torch.linalg.eigvalsh(h.double())
    assert eig[-1] / eig[0] > 1e4  # correlated, outlier-scaled: badly conditioned
    lam = damping * float(h.diagonal().mean())
    free = ~mask
    out = optimal_delta(w, wp, free, h, lam, tol=tol, max_iter=200)
    assert out.solver == "schur-pcg" and out.fallback == ""
    assert out.converged and out.residual <= tol
    ref = exact_delta(w, wp, free, h, lam)
    assert (out.delta[mask] == 0).all()
    assert (out.delta.double() - ref).norm() / ref.norm() < 10 * tol
    f0, f_ref = objective(torch.zeros_like(w), w, wp, h), objective(ref, w, wp, h)
    fraction = (f0 - objective(out.delta, w, wp, h)) / (f0 - f_ref)
    assert fraction == pytest.approx(1.0, abs=1e-5)
    # Few iterations (1e-4 is near fp32's floor for this residual), and far fewer than Jacobi-PCG on the
    # original system needs for the same tolerance.
    jacobi = masked_pcg(h, (w - wp) @ h, free, lam, tol=tol, max_iter=1000)
    assert out.iterations <= 20 and out.iterations < 0.6 * jacobi.iterations


def test_loose_tolerance_already_reaches_99_percent():
    w, wp, mask, h = ill_conditioned_layer(Unstructured(0.5))
    lam = 1e-2 * float(h.diagonal().mean())
    out = optimal_delta(w, wp, ~mask, h, lam, tol=1e-1, max_iter=200)
    ref = exact_delta(w, wp, ~mask, h, lam)
    f0 = objective(torch.zeros_like(w), w, wp, h)
    fraction = (f0 - objective(out.delta, w, wp, h)) / (f0 - objective(ref, w, wp, h))
    assert out.residual <= 1e-1 and out.iterations <= 6 and fraction >= 0.99


def test_trivial_rows_are_exact_without_iterations():
    w, wp, mask, h = ill_conditioned_layer(Unstructured(0.5))
    lam = 1e-2 * float(h.diagonal().mean())
    free = ~mask
    free[0] = True  # nothing fixed: the unconstrained optimum
    free[1] = False  # nothing free: no change
    wp = wp.clone()
    wp[2] = w[2]  # nothing to repair
    out = optimal_delta(w, wp, free, h, lam, tol=1e-5, max_iter=200)
    ref = exact_delta(w, wp, free, h, lam)
    assert torch.allclose(out.delta[0].double(), ref[0], atol=1e-4 * ref[0].abs().max())
    assert (out.delta[1] == 0).all() and (out.delta[2] == 0).all()
    assert out.converged and out.residual <= 1e-5
    everything = optimal_delta(w, wp, torch.ones_like(free), h, lam, tol=1e-5, max_iter=200)
    assert everything.iterations == 0 and everything.converged and everything.residual <= 1e-5


def test_cholesky_failure_falls_back_to_jacobi_pcg_and_says_so(caplog):
    w, wp, mask, h = ill_conditioned_layer(Unstructured(0.5))
    h = h.clone()
    h[5, :] = 0.0
    h[:, 5] = 0.0  # a dead input: H + 0·I is singular
    with caplog.at_level(logging.WARNING, logger="prac.correction.optimal"):
        out = optimal_delta(w, wp, ~mask, h, 0.0, tol=1e-5, max_iter=2000)
    assert out.solver == "jacobi-pcg" and "Cholesky" in out.fallback
    assert "Cholesky" in caplog.text
    assert out.converged and out.residual <= 2e-5 and torch.isfinite(out.delta).all()
    live = torch.ones(D_IN, dtype=torch.bool)
    live[5] = False
    free = ~mask & live
    ref = exact_delta(w[:, live], wp[:, live], free[:, live], h[live][:, live], 0.0)
    got = out.delta[:, live].double()
    assert (got - ref).norm() / ref.norm() < 1e-2


def test_stalled_rows_are_finished_by_jacobi_pcg(monkeypatch, caplog):
    """An inverse with a few percent error (as fp32 gives for a nearly singular H + λI) makes the
    Schur solve stall; those rows must still end at the tolerance, via Jacobi-PCG, and say so."""
    real = optimal._inverse

    def noisy(h, lam):
        g, cond, why = real(h, lam)
        noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
        noise = (noise + noise.T) * (0.03 * g.abs().mean())
        return g + noise, cond, why

    monkeypatch.setattr(optimal, "_inverse", noisy)
    w, wp, mask, h = ill_conditioned_layer(Unstructured(0.5))
    lam = 1e-2 * float(h.diagonal().mean())
    with caplog.at_level(logging.WARNING, logger="prac.correction.optimal"):
        out = optimal_delta(w, wp, ~mask, h, lam, tol=1e-5, max_iter=500)
    assert out.solver == "schur-pcg+jacobi-pcg" and "Jacobi-PCG" in out.fallback
    assert "stopped converging" in caplog.text
    assert out.converged and out.residual <= 2e-5
    ref = exact_delta(w, wp, ~mask, h, lam)
    assert (out.delta.double() - ref).norm() / ref.norm() < 1e-3


def test_hopelessly_ill_conditioned_inverse_is_not_used():
    w, wp, mask, h = ill_conditioned_layer(Unstructured(0.5), tokens=64)  # rank 64 < 128 inputs
    lam = 1e-9 * float(h.diagonal().mean())
    out = optimal_delta(w, wp, ~mask, h, lam, tol=1e-4, max_iter=2000)
    assert out.solver == "jacobi-pcg" and out.fallback
