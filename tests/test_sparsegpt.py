"""SparseGPT: exact small cases, a float64 dense OBS reference, invariances, and the bench smoke run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prac.core.errors import PracError
from prac.methods.masks import apply_mask, magnitude_scores, mask_from_scores, wanda_scores
from prac.methods.patterns import NM, Pattern, Unstructured
from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune

ROOT = Path(__file__).resolve().parents[1]


def correlated_problem(
    rows: int = 48, cols: int = 128, tokens: int = 1024, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """X = (Z A) · s: random mixing makes features correlated, log-normal s gives outlier channels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g)
    a = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    s = torch.exp(torch.randn(cols, generator=g))
    x = (z @ a) * s
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    return x, w


def relative_output_error(x: torch.Tensor, w0: torch.Tensor, w: torch.Tensor) -> float:
    """‖X(W − W₀)ᵀ‖² / ‖XW₀ᵀ‖² in float64."""
    x, w0, w = x.double(), w0.double(), w.double()
    return float((x @ (w - w0).T).square().sum() / (x @ w0.T).square().sum())


def obs_reference(
    w0: torch.Tensor, h: torch.Tensor, pattern: Pattern, blocksize: int, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential Optimal Brain Surgeon in float64 with explicit inverses of the trailing blocks.

    No Cholesky trick, no lazy batching: at column q the free set is F = {q, …}, the saliency
    of column j is w_j² / [(H_{j:,j:})⁻¹]_jj, and the compensation is the textbook OBS update.
    """
    w = w0.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0
    damping = percdamp * h.diagonal().mean()
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damping)
    w[:, dead] = 0.0
    cols = h.shape[0]
    tails = [torch.linalg.inv(h[q:, q:]) for q in range(cols)]
    d2 = torch.stack([t[0, 0] for t in tails])
    mask = torch.zeros_like(w, dtype=torch.bool)
    for q in range(cols):
        if isinstance(pattern, Unstructured) and q % blocksize == 0:
            block = slice(q, min(q + blocksize, cols))
            scores = w[:, block].square() / d2[block]
            k = int(scores.numel() * pattern.sparsity)
            mask[:, block] = scores <= scores.flatten().sort().values[k]
        if isinstance(pattern, NM) and q % pattern.m == 0:
            group = slice(q, q + pattern.m)
            order = torch.sort(w[:, group].square() / d2[group], dim=1, stable=True).indices
            mask[:, group] = torch.zeros_like(mask[:, group]).scatter_(1, order[:, : pattern.m - pattern.n], True)
        delta = torch.where(mask[:, q], w[:, q], 0.0)
        w[:, q:] -= delta[:, None] * tails[q][0][None, :] / tails[q][0, 0]
        w[:, q] = torch.where(mask[:, q], 0.0, w[:, q])
    return w, mask


# -- exact hand-built cases ----------------------------------------------------------------------


def test_diagonal_hessian_nm_is_magnitude_pruning() -> None:
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    result = sparsegpt_prune(w, torch.eye(8), NM(2, 4))
    assert result.weight.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]
    assert result.mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_diagonal_hessian_unstructured_uses_the_reference_count() -> None:
    """H = I: no compensation; each block prunes its int(numel · s) + 1 smallest |w|."""
    w = torch.tensor([[5.0, -1.0, 3.0, 8.0, 2.0, -7.0, 4.0, 6.0]])
    result = sparsegpt_prune(w, torch.eye(8), Unstructured(0.5), SparseGPTConfig(blocksize=4))
    # block [5, -1, 3, 8]: int(4 · 0.5) + 1 = 3 pruned; block [2, -7, 4, 6] likewise
    assert result.weight.tolist() == [[0, 0, 0, 8, 0, -7, 0, 0]]


# -- against the float64 dense reference -----------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, blocksize",
    [(Unstructured(0.5), 16), (Unstructured(0.7), 24), (NM(2, 4), 16), (NM(3, 8), 8), (NM(1, 4), 32)],
)
def test_matches_dense_obs_reference(pattern: Pattern, blocksize: int) -> None:
    x, w = correlated_problem(rows=12, cols=48, tokens=400, seed=1)
    h = x.T @ x
    result = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=blocksize))
    ref_w, ref_mask = obs_reference(w, h, pattern, blocksize)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=0, atol=2e-4 * float(w.abs().max()))


def test_error_estimate_is_the_damped_objective() -> None:
    x, w = correlated_problem(seed=2)
    h = x.T @ x
    result = sparsegpt_prune(w, h, Unstructured(0.6))
    h_damped = h.double() + result.diagnostics["damping"] * torch.eye(h.shape[0], dtype=torch.float64)
    delta = (result.weight - w).double()
    exact = float(((delta @ h_damped) * delta).sum())
    assert result.diagnostics["error_estimate"] == pytest.approx(exact, rel=1e-3)


# -- patterns ------------------------------------------------------------------------------------


def test_sparsity_zero_returns_the_weight_unchanged() -> None:
    x, w = correlated_problem()
    result = sparsegpt_prune(w, x.T @ x, Unstructured(0.0))
    assert torch.equal(result.weight, w)
    assert not result.mask.any()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8), (5, 8)])
def test_every_nm_group_keeps_exactly_n(n: int, m: int) -> None:
    x, w = correlated_problem(cols=64, seed=3)
    result = sparsegpt_prune(w, x.T @ x, NM(n, m))
    kept = (result.weight != 0).reshape(w.shape[0], -1, m).sum(dim=-1)
    assert (kept == n).all()
    assert torch.equal(result.mask, result.weight == 0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_unstructured_count_per_block_follows_the_reference_rule(sparsity: float) -> None:
    """Each column block prunes int(numel · s) + 1 weights; the last block may be narrower."""
    blocksize = 32
    x, w = correlated_problem(rows=40, cols=80, seed=4)
    result = sparsegpt_prune(w, x.T @ x, Unstructured(sparsity), SparseGPTConfig(blocksize=blocksize))
    for start in range(0, 80, blocksize):
        block = result.mask[:, start : start + blocksize]
        assert int(block.sum()) == int(block.numel() * sparsity) + 1
    assert torch.equal(result.mask, result.weight == 0)


def test_pruned_entries_are_exactly_zero() -> None:
    x, w = correlated_problem(seed=5)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        result = sparsegpt_prune(w, x.T @ x, pattern)
        assert result.weight.dtype == torch.float32
        assert (result.weight[result.mask] == 0).all()
        assert result.mask.dtype == torch.bool and result.mask.shape == w.shape


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8)])
def test_nm_blocksize_m_and_128_agree(pattern: NM) -> None:
    x, w = correlated_problem(cols=256, seed=6)
    h = x.T @ x
    small = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=pattern.m))
    large = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=128))
    assert torch.equal(small.mask, large.mask)
    torch.testing.assert_close(small.weight, large.weight, rtol=1e-4, atol=1e-5)


def test_nm_blocksize_must_be_a_multiple_of_m() -> None:
    x, w = correlated_problem(cols=64)
    with pytest.raises(PracError, match="multiple of M=8"):
        sparsegpt_prune(w, x.T @ x, NM(4, 8), SparseGPTConfig(blocksize=12))
    with pytest.raises(PracError, match="does not divide"):
        sparsegpt_prune(w[:, :62], (x.T @ x)[:62, :62], NM(2, 4))


# -- quality ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_error_below_wanda_below_magnitude(pattern: Pattern) -> None:
    x, w = correlated_problem(rows=64, cols=128, tokens=2048, seed=7)
    l2 = x.square().sum(dim=0).sqrt()
    wanda = apply_mask(w, mask_from_scores(wanda_scores(w, l2), pattern))
    magnitude = apply_mask(w, mask_from_scores(magnitude_scores(w), pattern))
    sparse = sparsegpt_prune(w, x.T @ x, pattern).weight
    errors = [relative_output_error(x, w, v) for v in (sparse, wanda, magnitude)]
    assert errors[0] <= errors[1] <= errors[2], errors
    assert errors[0] < 0.9 * errors[1]


# -- invariances and robustness ------------------------------------------------------------------


def test_hessian_scale_invariance() -> None:
    x, w = correlated_problem(seed=8)
    h = x.T @ x
    base = sparsegpt_prune(w, h, Unstructured(0.5))
    for scale in (1.0 / x.shape[0], 2.0 / x.shape[0], 1e3):
        other = sparsegpt_prune(w, h * scale, Unstructured(0.5))
        assert torch.equal(other.mask, base.mask)
        torch.testing.assert_close(other.weight, base.weight, rtol=1e-4, atol=1e-5)
        assert other.diagnostics["error_estimate"] == pytest.approx(
            base.diagnostics["error_estimate"] * scale, rel=1e-3
        )


def test_deterministic_and_inputs_untouched() -> None:
    x, w = correlated_problem(seed=9)
    h = x.T @ x
    w_copy, h_copy = w.clone(), h.clone()
    first = sparsegpt_prune(w, h, NM(2, 4))
    second = sparsegpt_prune(w, h, NM(2, 4))
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)
    assert torch.equal(w, w_copy) and torch.equal(h, h_copy)


def test_dead_inputs_are_zeroed_and_counted() -> None:
    x, w = correlated_problem(rows=16, cols=64, tokens=400, seed=10)
    dead = [3, 17, 60]
    x[:, dead] = 0.0
    h = x.T @ x
    for pattern in (Unstructured(0.5), NM(2, 4)):
        result = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=32))
        assert result.diagnostics["dead_inputs"] == len(dead)
        assert torch.isfinite(result.weight).all()
        assert (result.weight[:, dead] == 0).all()
        ref_w, ref_mask = obs_reference(w, h, pattern, 32)
        assert torch.equal(result.mask, ref_mask)
        torch.testing.assert_close(result.weight.double(), ref_w, rtol=0, atol=1e-4)


def test_failed_cholesky_is_retried_with_more_damping_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    """diag(H) = (−0.5, 1, …, 1): λ = percdamp · 0.906 first makes H + λI positive at percdamp 1."""
    h = torch.eye(16)
    h[0, 0] = -0.5
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="prac.methods.sparsegpt"):
        result = sparsegpt_prune(w, h, Unstructured(0.5))
    assert result.diagnostics["cholesky_retries"] == 2
    assert result.diagnostics["percdamp"] == pytest.approx(1.0)
    assert "Cholesky failed 2 time(s)" in caplog.text
    with pytest.raises(PracError, match="Cholesky .* failed 2 time"):
        sparsegpt_prune(w, h, Unstructured(0.5), SparseGPTConfig(damping_retries=1))


def test_bad_inputs_raise() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(PracError, match="NaN"):
        sparsegpt_prune(w, torch.full((8, 8), float("nan")), Unstructured(0.5))
    with pytest.raises(PracError, match="expected \\(8, 8\\)"):
        sparsegpt_prune(w, torch.eye(6), Unstructured(0.5))


# -- the per-layer benchmark ---------------------------------------------------------------------


def test_layer_speed_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "layer_speed.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layer_speed.py"), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| sparsegpt |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    patterns = {r["pattern"] for r in rows}
    assert patterns == {"0.5", "2:4"}
    sparse = [r for r in rows if r["method"] == "sparsegpt"]
    assert len(sparse) == 2
    for r in sparse:
        assert r["seconds"] > 0 and 0 < r["relative_error"] < 1
    # prac.correction ships with prac: the bench script catches its ImportError to keep timing SparseGPT,
    # so here a failed import is a failure, not a skip
    assert report["correction_available"], report.get("correction_import_error")
    assert "not importable" not in proc.stdout + proc.stderr
    for method in ("full", "diagonal", "greedy", "optimal"):
        got = [r for r in rows if r["method"] == method]
        assert len(got) == 2, method
        for r in got:
            assert "error" not in r, r.get("error")
            assert r["seconds"] > 0 and r["ratio_to_sparsegpt"] > 0
            assert r["fraction_of_optimal"] is not None
            assert r["relative_error"] <= r["wanda_relative_error"] * (1 + 1e-5)
