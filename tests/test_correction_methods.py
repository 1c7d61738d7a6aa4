"""Correction methods against float64 references and their contract (mask, clamp, revert, determinism)."""

import json
import math

import pytest
import torch

from prac.core.errors import PracError
from prac.correction import (
    YARDSTICK_DAMPING,
    YARDSTICK_TOL,
    CorrectionConfig,
    correct,
    format_diagnostics,
    stats_spec,
    summarize,
)
from prac.correction.diagonal import diagonal_delta
from prac.correction.full import full_delta, solve_rows
from prac.correction.greedy import greedy_delta
from prac.correction.objective import (
    james_stein_mean,
    relative_error,
    sample_hessian,
    sorted_support,
    sparse_quadratic_rows,
)
from prac.correction.optimal import masked_pcg
from prac.correction.selection import select
from prac.methods.masks import apply_mask, mask_from_scores, wanda_scores
from prac.methods.patterns import Unstructured
from prac.model.stats import InputStats

D_IN, D_OUT, TOKENS = 48, 24, 2048


def correlated_inputs(tokens: int = TOKENS, d: int = D_IN, seed: int = 0, mean: float = 0.5) -> torch.Tensor:
    """X = Z A + m: correlated features (A mixes them) with a condition number of H about 100."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    a = q * torch.logspace(0, 1, d).unsqueeze(0)
    return torch.randn(tokens, d, generator=g) @ a + mean * torch.randn(d, generator=g)


def layer(x: torch.Tensor, cfg: CorrectionConfig, seed: int = 1, sparsity: float = 0.5):
    """Weights, Wanda mask (True = pruned), scores and statistics collected as ``cfg`` asks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, x.shape[1], generator=g)
    stats = InputStats(x.shape[1], spec=stats_spec(cfg))
    for chunk in x.split(512):
        stats.add_batch(chunk)
    scores = wanda_scores(w, stats.l2)
    mask = mask_from_scores(scores, Unstructured(sparsity))
    return w, apply_mask(w, mask), mask, stats, scores


def lstsq_reference(x: torch.Tensor, w: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """float64: per row, the least-squares fit of X w_origᵀ using only the free inputs."""
    xd, ref = x.double(), torch.zeros_like(w, dtype=torch.float64)
    target = xd @ w.double().T
    for i in range(w.shape[0]):
        cols = free[i].nonzero().flatten()
        ref[i, cols] = torch.linalg.lstsq(xd[:, cols], target[:, i : i + 1], driver="gelsd").solution[:, 0]
    return ref


CONFIGS = {
    "full": CorrectionConfig.of("full", percent_change=0.25),
    "diagonal": CorrectionConfig.of("diagonal", percent_change=0.25),
    "greedy": CorrectionConfig.of("greedy", percent_change=0.25, max_activation_samples=512),
    "optimal": CorrectionConfig.of("optimal"),
}


@pytest.fixture(scope="module")
def x():
    return correlated_inputs()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_contract_mask_zeros_inputs_untouched_deterministic(x, method):
    cfg = CONFIGS[method]
    w, wp, mask, stats, scores = layer(x, cfg)
    copies = [t.clone() for t in (w, wp, mask, scores)]
    first = correct(w, wp, mask, stats, scores, cfg)
    second = correct(w, wp, mask, stats, scores, cfg)
    assert torch.equal(first.weight, second.weight)  # bit-identical
    assert all(torch.equal(a, b) for a, b in zip(copies, (w, wp, mask, scores)))
    assert first.weight.dtype == torch.float32
    assert (first.weight[mask] == 0).all()
    d = first.diagnostics
    assert d["status"] == "accepted" and not d["reverted"]
    assert d["error_after"] < d["error_before"]
    assert d["error_source"] == "hessian"
    assert -1e-6 <= d["fraction_of_optimal"] <= 1 + 1e-3
    assert d["optimal_residual"] <= YARDSTICK_TOL * 1.5
    json.dumps(d, allow_nan=False)  # flat and JSON-serialisable
    assert all(isinstance(v, (int, float, str, bool)) for v in d.values())
    if method != "optimal":
        # Only selected survivors may change.
        sel = select(scores, mask, d["strategy"], cfg.settings.percent_change)
        assert torch.equal(first.weight[~sel], wp[~sel])


def test_none_returns_w_pruned_unchanged(x):
    cfg = CorrectionConfig.of("none")
    w, wp, mask, stats, scores = layer(x, cfg)
    result = correct(w, wp, mask, stats, scores, cfg)
    assert result.weight is wp and result.diagnostics == {}
    assert format_diagnostics("q", result.diagnostics) == "q: no correction"


def test_full_all_equals_float64_least_squares(x):
    cfg = CorrectionConfig.of("full", selection_strategy="all", damping=1e-9, max_correction_magnitude=math.inf)
    w, wp, mask, stats, scores = layer(x, cfg)
    result = correct(w, wp, mask, stats, scores, cfg)
    ref = lstsq_reference(x, w, ~mask)
    assert torch.allclose(result.weight.double(), ref, rtol=0, atol=2e-4 * ref.abs().max())
    assert result.diagnostics["solve_failures"] == 0
    assert result.diagnostics["fraction_of_optimal"] == pytest.approx(1.0, abs=1e-3)


def test_optimal_matches_reference_within_tolerance(x):
    cfg = CorrectionConfig.of("optimal", damping=YARDSTICK_DAMPING, tol=1e-5, max_iter=500)
    w, wp, mask, stats, scores = layer(x, cfg)
    result = correct(w, wp, mask, stats, scores, cfg)
    d = result.diagnostics
    assert d["solver_converged"] and d["solver_residual"] <= 2e-5 and d["solver_iterations"] > 0
    ref = lstsq_reference(x, w, ~mask)
    assert torch.allclose(result.weight.double(), ref, rtol=0, atol=1e-3 * ref.abs().max())
    h = stats.normalized_hessian().double()
    err_ref = relative_error(ref, w.double(), h)
    assert d["error_after"] == pytest.approx(err_ref, rel=1e-3)
    assert d["fraction_of_optimal"] == 1.0  # the yardstick is this very solve (same damping, all survivors)


def test_optimal_with_default_damping_is_near_the_yardstick(x):
    cfg = CorrectionConfig.of("optimal")
    w, wp, mask, stats, scores = layer(x, cfg)
    d = correct(w, wp, mask, stats, scores, cfg).diagnostics
    assert 0.98 <= d["fraction_of_optimal"] <= 1 + 1e-3


def test_pcg_rows_with_nothing_to_do_and_dead_features():
    h = torch.diag(torch.tensor([2.0, 0.0, 1.0]))  # feature 1 never fires
    rhs = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    free = torch.ones(2, 3, dtype=torch.bool)
    out = masked_pcg(h, rhs, free, lam=0.0, tol=1e-6, max_iter=10)
    assert torch.allclose(out.delta, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert out.converged and torch.isfinite(out.delta).all()


def test_full_chunked_solve_equals_one_chunk(x):
    cfg = CorrectionConfig.of("full")
    w, wp, mask, stats, scores = layer(x, cfg)
    h = stats.normalized_hessian()
    rhs = (w - wp) @ h
    sel = ~mask
    one = solve_rows(h, rhs, sel, 1e-3, 1 << 30)
    many = solve_rows(h, rhs, sel, 1e-3, 24 * 24 * 32 * 5)  # 5 rows per chunk
    assert torch.allclose(one.delta, many.delta, rtol=1e-5, atol=1e-6)
    assert torch.allclose(one.quad, many.quad, rtol=1e-5, atol=1e-7)
    many = many.delta
    ref = lstsq_reference(x, w, sel) - wp.double()  # δ at damping ~0 for comparison of scale only
    assert (many - ref.float()).norm() / ref.norm() < 0.05


def test_solve_failure_falls_back_to_min_norm_lstsq_and_is_counted():
    x = correlated_inputs()
    x[:, 3] = 0.0  # a dead input feature: H_SS is exactly singular for every row keeping it
    cfg = CorrectionConfig.of("full", selection_strategy="all", damping=0.0, max_correction_magnitude=math.inf)
    w, _, _, stats, scores = layer(x, cfg)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, ::2] = True  # keep column 3 in every row
    wp = apply_mask(w, mask)
    result = correct(w, wp, mask, stats, scores, cfg)
    d = result.diagnostics
    assert d["solve_failures"] == D_OUT
    assert "lstsq" in d["solve_fallback"]
    assert d["status"] == "accepted"
    # The minimum-norm solution leaves the dead weight alone and is the least-squares optimum elsewhere.
    assert torch.equal(result.weight[:, 3], wp[:, 3])
    ref = lstsq_reference(x, w, ~mask)
    live = torch.ones(x.shape[1], dtype=torch.bool)
    live[3] = False
    got, want = result.weight[:, live].double(), ref[:, live]
    assert torch.allclose(got, want, atol=1e-3 * want.abs().max())
    assert "Solve failures: 24" in format_diagnostics("l", d)


@pytest.mark.parametrize("method", ["full", "diagonal"])
def test_clamp_bound_respected_and_counted(x, method):
    cfg = CorrectionConfig.of(method, selection_strategy="all", max_correction_magnitude=0.01)
    w, wp, mask, stats, scores = layer(x, cfg)
    result = correct(w, wp, mask, stats, scores, cfg)
    change = (result.weight - wp).abs()
    # w_pruned + δ rounds to fp32, so the change read back may exceed |δ| by an ulp of |w|.
    assert (change <= (0.01 + 1e-6) * w.abs()).all()
    d = result.diagnostics
    assert d["clamped"] > 0 and d["clamped_pct"] == pytest.approx(100 * d["clamped"] / d["selected"])
    sel = ~mask
    if method == "full":
        h = stats.normalized_hessian()
        proposal = full_delta((w - wp) @ h, w, sel, h, d["lambda"], 1 << 30).delta
    else:
        proposal = diagonal_delta(w, wp, sel, james_stein_mean(stats), d["lambda"])
    assert d["clamped"] == int((proposal.abs() > 0.01 * w.abs()).sum())


def test_greedy_closed_form_monotone_and_patience(x):
    cfg = CONFIGS["greedy"]
    w, wp, mask, stats, scores = layer(x, cfg)
    hs = sample_hessian(stats.samples)
    sel = select(scores, mask, "weakest", 0.5)
    run = greedy_delta(w, wp, sel, scores, hs, step=0.05, patience=10**6, trace=True)
    assert all(b <= a for a, b in zip(run.trace, run.trace[1:]))
    assert run.trace[-1] < run.trace[0]
    # The incrementally tracked error equals the error recomputed on the stored tokens.
    d = wp + run.delta - w
    direct = ((stats.samples @ d.T).square().sum() / stats.samples.shape[0]).item()
    assert run.trace[-1] == pytest.approx(direct, rel=1e-4)
    # ... and so does the tracked δᵀHδ of every row.
    dense = ((run.delta.double() @ hs.double()) * run.delta.double()).sum(dim=1)
    assert torch.allclose(run.quad.double(), dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max()))
    assert run.visited == run.candidates and run.rows_stopped_early == 0
    # Every accepted step is exactly ±step·|w_orig|.
    moved = run.delta != 0
    assert torch.allclose(run.delta[moved].abs(), 0.05 * w.abs()[moved])
    assert run.corrected == int(moved.sum())
    # Big steps get rejected; patience 1 stops rows at their first rejection.
    big = greedy_delta(w, wp, sel, scores, hs, step=1.5, patience=1)
    assert big.rows_stopped_early > 0 and big.visited < big.candidates


def test_greedy_report_and_samples_only_errors(x):
    cfg = CONFIGS["greedy"].replace(exact_errors=False)
    w, wp, mask, stats, scores = layer(x, cfg)
    assert stats.hessian is None
    d = correct(w, wp, mask, stats, scores, cfg).diagnostics
    assert d["error_source"] == "samples" and "fraction_of_optimal" not in d
    assert 0 < d["positions_corrected"] <= d["candidates"] and d["positions_visited"] <= d["candidates"]
    text = format_diagnostics("mlp.up_proj", d)
    assert "Error before (samples)" in text and "Positions corrected" in text


def test_james_stein_mean_lies_between_raw_and_grand_mean():
    for tokens, seed in ((16, 0), (4096, 1)):
        x = correlated_inputs(tokens=tokens, seed=seed, mean=0.3)
        stats = InputStats(x.shape[1])
        stats.add_batch(x)
        raw = stats.mean
        grand = raw.mean()
        mu = james_stein_mean(stats)
        assert ((mu - grand) * (raw - grand) >= 0).all()
        assert ((mu - grand).abs() <= (raw - grand).abs() + 1e-7).all()
    # Few noisy tokens shrink hard; many tokens barely shrink.
    assert (mu - grand).norm() / (raw - grand).norm() > 0.9


def test_never_worse_reverts_a_harmful_correction():
    # Zero-mean inputs: the sample mean is noise, so the first-moment correction cannot help.
    x = correlated_inputs(mean=0.0)
    cfg = CorrectionConfig.of("diagonal", selection_strategy="all", damping=0.0, max_correction_magnitude=math.inf)
    w, wp, mask, stats, scores = layer(x, cfg)
    result = correct(w, wp, mask, stats, scores, cfg)
    d = result.diagnostics
    assert d["error_proposed"] > d["error_before"]
    assert d["reverted"] and d["status"] == "reverted"
    assert torch.equal(result.weight, wp) and result.weight is not wp
    assert d["error_after"] == d["error_before"] and d["reduction"] == 0.0
    assert "rejected proposal" in format_diagnostics("l", d)


def test_missing_statistics_are_a_clear_error(x):
    w, wp, mask, stats, scores = layer(x, CorrectionConfig.of("diagonal", exact_errors=False))
    stats.samples = None
    with pytest.raises(PracError, match="Hessian or stored token samples"):
        correct(w, wp, mask, stats, scores, CorrectionConfig.of("diagonal", exact_errors=False))
    w, wp, mask, stats, scores = layer(x, CorrectionConfig.of("greedy", exact_errors=False))
    with pytest.raises(PracError, match="needs the input Hessian"):
        correct(w, wp, mask, stats, scores, CorrectionConfig.of("full"))


def test_summarize_rolls_up(x):
    diags = []
    for method in ("full", "diagonal", "optimal"):
        w, wp, mask, stats, scores = layer(x, CONFIGS[method])
        diags.append(correct(w, wp, mask, stats, scores, CONFIGS[method]).diagnostics)
    diags.append({})  # a "none" layer
    s = summarize(diags)
    assert s["layers"] == 3 and s["reverted"] == 0 and s["total_solve_failures"] == 0
    assert s["mean_error_after"] < s["mean_error_before"]
    assert s["mean_reduction"] == pytest.approx(sum(d["reduction"] for d in diags[:3]) / 3)
    assert 0 < s["mean_fraction_of_optimal"] <= 1 + 1e-3
    json.dumps(s, allow_nan=False)
    text = format_diagnostics("model.layers.0.self_attn.q_proj", diags[0])
    assert "Error before (full H):" in text and "Fraction of optimal:" in text and "Clamped:" in text


def _direct_relative_error(w: torch.Tensor, w_orig: torch.Tensor, h: torch.Tensor) -> float:
    """‖X(W − W₀)ᵀ‖² / ‖XW₀ᵀ‖² in float64, straight from the definition."""
    h, w, w_orig = h.double(), w.double(), w_orig.double()
    return float(relative_error(w, w_orig, h))


@pytest.mark.parametrize("source", ["hessian", "samples"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_reported_errors_equal_the_direct_computation(x, method, source):
    # correct() measures errors from H d and each method's own δᵀHδ instead of recomputing X W.
    cfg = CONFIGS[method]
    if source == "samples":
        if method in ("full", "optimal"):
            pytest.skip("full and optimal need the Hessian")
        cfg = cfg.replace(exact_errors=False, max_activation_samples=512)
    w, wp, mask, stats, scores = layer(x, cfg)
    d = correct(w, wp, mask, stats, scores, cfg).diagnostics
    assert d["error_source"] == source
    h = stats.normalized_hessian() if source == "hessian" else sample_hessian(stats.samples)
    result = correct(w, wp, mask, stats, scores, cfg)  # deterministic: the weight d describes
    assert d["error_before"] == pytest.approx(_direct_relative_error(wp, w, h), rel=1e-5)
    assert d["error_after"] == pytest.approx(_direct_relative_error(result.weight, w, h), rel=1e-4, abs=1e-9)
    if "optimal_error" in d:
        ref = lstsq_reference(x, w, ~mask)  # the undamped optimum over all survivors
        assert d["optimal_error"] == pytest.approx(_direct_relative_error(ref.float(), w, h), rel=1e-3)


def test_sparse_quadratic_rows_equals_dense():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    h = (a @ a.T / 64).float()
    support = torch.rand(10, 64, generator=g) < 0.1  # small supports: the gather path
    support[0] = False  # an empty row
    delta = torch.randn(10, 64, generator=g) * support
    got = sparse_quadratic_rows(delta, h, support)
    want = ((delta.double() @ h.double()) * delta.double()).sum(dim=1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[0] == 0
    wide = torch.ones_like(support)  # large supports: the dense path
    assert torch.allclose(sparse_quadratic_rows(delta, h, wide).double(), want, rtol=1e-5, atol=1e-6)
    idx, valid = sorted_support(support)
    assert valid.sum() == support.sum() and (idx.diff(dim=1)[valid[:, 1:]] > 0).all()


def test_yardstick_is_solved_tightly_whatever_the_method_tolerance(x):
    cfg = CorrectionConfig.of("optimal", tol=0.3, damping=YARDSTICK_DAMPING)
    w, wp, mask, stats, scores = layer(x, cfg)
    d = correct(w, wp, mask, stats, scores, cfg).diagnostics
    assert YARDSTICK_TOL < d["solver_residual"] <= 0.3  # the loose solve stopped early ...
    assert d["optimal_residual"] <= 1.5 * YARDSTICK_TOL  # ... and was not reused as the yardstick
    assert d["fraction_of_optimal"] < 1.0


def test_full_with_unequal_rows_equals_float64_least_squares(x):
    # Rows keep different numbers of weights (as SparseGPT's masks do), so most rows' systems are
    # padded; every row must still get its own exact solution, column 0 included.
    cfg = CorrectionConfig.of("full", selection_strategy="all", damping=1e-9, max_correction_magnitude=math.inf)
    w, _, _, stats, scores = layer(x, cfg)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(w.shape, generator=g) < torch.linspace(0.2, 0.8, w.shape[0]).unsqueeze(1)
    mask[:, 0] = False  # column 0 survives everywhere (padding must never clobber it)
    wp = apply_mask(w, mask)
    assert len(set((~mask).sum(dim=1).tolist())) > 5
    result = correct(w, wp, mask, stats, scores, cfg)
    ref = lstsq_reference(x, w, ~mask)
    assert torch.allclose(result.weight.double(), ref, rtol=0, atol=2e-4 * ref.abs().max())
    solve = solve_rows(stats.normalized_hessian(), (w - wp) @ stats.normalized_hessian(), ~mask, 1e-3, 1 << 30)
    dense = ((solve.delta.double() @ stats.normalized_hessian().double()) * solve.delta.double()).sum(dim=1)
    assert torch.allclose(solve.quad.double(), dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max()))
