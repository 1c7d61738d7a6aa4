"""Exact algebra of the Fisher spectral module on a tiny float64 causal LM, against dense references.

The reference is deliberately independent of the module: per-sample gradients by a plain
``backward()`` loop on a log-softmax/gather loss, the explicit P×P matrix F = (1/N) GᵀG, and
``torch.linalg.eigvalsh`` on it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from prac.core.errors import PracError
from prac.spectral import FisherSpectral, SpectralConfig, SpectralResult
from prac.spectral import blocks as blk
from prac.spectral import solvers as sol

VOCAB, DIM = 11, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class CausalMix(nn.Module):
    """Causal 'attention': a linear map of the running mean of the previous positions."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, h):
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        return self.proj(h.cumsum(dim=1) / steps)


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = CausalMix(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        h = h + self.attn(h)
        return self.norm(h + self.mlp(h))


class TinyLM(nn.Module):
    """Names follow HF conventions: ``embed_tokens``, ``layers.N.{attn,mlp,norm}``, ``lm_head``."""

    def __init__(self, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Layer(DIM) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(DIM)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.embed_tokens(input_ids))
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.final_norm(h))


def tiny(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(**kw).double()
    with torch.no_grad():  # LayerNorm starts at 1/0: perturb so every parameter has a generic gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(n: int, t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def reference_rows(model, ids, labels=None, reduction="sum", scale=1.0) -> tuple[torch.Tensor, list[str]]:
    """G [N, P] by one backward per sequence, independent of the module under test."""
    names = [n for n, _ in model.named_parameters()]
    labels = ids if labels is None else labels
    rows = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        logp = torch.log_softmax(model(ids[i:i + 1])[0, :-1], dim=-1)
        tgt = labels[i, 1:]
        keep = tgt != -100
        nll = -logp[torch.arange(tgt.numel())[keep], tgt[keep]]
        loss = nll.sum() if reduction == "sum" else nll.mean()
        (scale * loss).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad()
    return torch.stack(rows), names


def dense_spectrum(G: torch.Tensor) -> torch.Tensor:
    F = G.T @ G / G.shape[0]
    return torch.linalg.eigvalsh(F).flip(0)


def columns(model) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def block_columns(model, result: SpectralResult, key: str) -> torch.Tensor:
    cols = columns(model)
    part = blk.partition_model(model, result.metadata["block_structure"])
    block = next(b for b in part.blocks if b.key == key)
    return torch.cat([torch.arange(cols[n].start, cols[n].stop) for n in block.names])


def compute(model, ids, structure="layer_type", center=False, **cfg) -> SpectralResult:
    return FisherSpectral(SpectralConfig(**cfg)).compute_fisher_spectrum(
        model, ids, block_structure=structure, center_gradients=center)


def assert_top(values: torch.Tensor, reference: torch.Tensor, k: int = 10, rtol: float = 1e-8) -> None:
    k = min(k, values.numel())
    torch.testing.assert_close(values[:k], reference[:k], rtol=rtol, atol=1e-13 * float(reference[0]))


# ---------------------------------------------------------------------------- against the dense F

@pytest.mark.parametrize("structure", ["layer_type", "layer", "model"])
def test_matches_dense_fisher_per_block_and_whole(structure):
    model, ids = tiny(), tokens(12)
    res = compute(model, ids, structure)
    G, _ = reference_rows(model, ids)
    assert_top(res.whole_model.eigenvalues, dense_spectrum(G))
    assert res.whole_model.trace == pytest.approx(float((G * G).sum() / 12), rel=1e-10)
    for key, b in res.blocks.items():
        Gb = G[:, block_columns(model, res, key)]
        ref = dense_spectrum(Gb)
        assert b.eigenvalues.numel() == min(12, Gb.shape[1])
        assert_top(b.eigenvalues, ref)
        assert b.trace == pytest.approx(float(torch.trace(Gb.T @ Gb) / 12), rel=1e-10)
        assert b.top_eigenvalue == pytest.approx(float(ref[0]), rel=1e-10)


def test_trace_identity_and_block_traces_sum_to_model_trace():
    model, ids = tiny(), tokens(9)
    res = compute(model, ids)
    G, _ = reference_rows(model, ids)
    mean_sq_norm = float((G.norm(dim=1) ** 2).mean())
    assert res.whole_model.trace == pytest.approx(mean_sq_norm, rel=1e-12)
    assert sum(b.trace for b in res.blocks.values()) == pytest.approx(res.whole_model.trace, rel=1e-12)
    assert float(res.whole_model.eigenvalues.sum()) == pytest.approx(mean_sq_norm, rel=1e-9)
    assert sum(b.n_params for b in res.blocks.values()) == sum(p.numel() for p in model.parameters())


def test_gram_and_covariance_share_nonzero_spectrum():
    gen = torch.Generator().manual_seed(0)
    for n, p in [(5, 40), (30, 6)]:
        G = torch.randn(n, p, dtype=torch.float64, generator=gen)
        gram_vals, _ = sol.eigvalsh_descending(sol.gram(G) / n, torch.device("cpu"))
        cov_vals = torch.linalg.eigvalsh(G.T @ G / n).flip(0)
        r = min(n, p)
        torch.testing.assert_close(gram_vals[:r], cov_vals[:r], rtol=1e-10, atol=1e-12)
        assert gram_vals[r:].abs().max().item() < 1e-10 if n > p else True


def test_sum_of_per_sample_gradients_is_gradient_of_summed_loss():
    model, ids = tiny(), tokens(5)
    G, _ = reference_rows(model, ids)
    res_rows = _module_rows(model, ids)
    torch.testing.assert_close(res_rows, G, rtol=1e-10, atol=1e-12)
    model.zero_grad()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(res_rows.sum(0), total, rtol=1e-10, atol=1e-12)


def _module_rows(model, ids, engine="vmap", unit="sequence", labels=None):
    from prac.spectral import gradients as grd

    samples, _ = grd.make_samples({"input_ids": ids, **({"labels": labels} if labels is not None else {})})
    names = [n for n, _ in model.named_parameters()]
    if engine == "vmap":
        g = grd.vmap_gradients(model, names, samples, unit, "sum", True, 3)
    else:
        g = grd.loop_gradients(model, names, samples, unit, "sum", True)
    return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)


@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_vmap_and_loop_gradients_agree(unit):
    model, ids = tiny(), tokens(4)
    labels = ids.clone()
    labels[1, 3:5] = -100
    a = _module_rows(model, ids, "vmap", unit, labels)
    b = _module_rows(model, ids, "loop", unit, labels)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if unit == "token":
        assert a.shape[0] == int((labels[:, 1:] != -100).sum())
        seq = _module_rows(model, ids, "vmap", "sequence", labels)
        # the token gradients of a sequence add up to its sequence gradient
        counts = (labels[:, 1:] != -100).sum(1).tolist()
        torch.testing.assert_close(torch.stack([r.sum(0) for r in a.split(counts)]), seq, rtol=1e-10, atol=1e-12)


def test_engines_give_the_same_spectrum_and_say_which_ran():
    model, ids = tiny(), tokens(6)
    a = compute(model, ids, gradient_engine="vmap")
    b = compute(model, ids, gradient_engine="loop")
    assert a.metadata["gradient_engine"]["used"] == "vmap"
    assert b.metadata["gradient_engine"]["used"] == "loop"
    torch.testing.assert_close(a.whole_model.eigenvalues, b.whole_model.eigenvalues, rtol=1e-10, atol=1e-14)


def test_token_unit_matches_dense_per_token_fisher():
    model, ids = tiny(), tokens(3, t=6)
    res = compute(model, ids, "model", sample_unit="token")
    rows = []
    for i in range(3):
        for t in range(5):
            model.zero_grad()
            logp = torch.log_softmax(model(ids[i:i + 1])[0, t], dim=-1)
            (-logp[ids[i, t + 1]]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    G = torch.stack(rows)
    assert res.metadata["n_samples_used"] == 15 and res.metadata["n_tokens"] == 15
    assert res.metadata["sample_unit"] == "token"
    assert_top(res["model"].eigenvalues, dense_spectrum(G))


# ---------------------------------------------------------------------------- centring

def test_centering_removes_the_mean_and_has_an_exact_zero_eigenvalue():
    model, ids = tiny(), tokens(8)
    F = compute(model, ids, "model")
    C = compute(model, ids, "model", center=True)
    G, _ = reference_rows(model, ids)
    gbar = G.mean(0)
    assert F["model"].trace - C["model"].trace == pytest.approx(float(gbar @ gbar), rel=1e-9)
    assert_top(C["model"].eigenvalues, dense_spectrum(G - gbar))
    lam = C["model"].eigenvalues
    assert lam.numel() == 8 and abs(float(lam[-1])) <= C["model"].tol
    assert C["model"].numerical_rank == 7
    assert C["model"].condition_number == pytest.approx(float(lam[0] / lam[-2]), rel=1e-10)
    assert C.metadata["centered"] is True and any("exact zero" in n for n in C.metadata["notes"])


# ---------------------------------------------------------------------------- invariances

def test_permuting_samples_changes_nothing():
    model, ids = tiny(), tokens(7)
    a = compute(model, ids, center=True)
    b = compute(model, ids[torch.tensor([3, 0, 6, 1, 5, 2, 4])], center=True)
    for key in a.blocks:
        torch.testing.assert_close(a[key].eigenvalues, b[key].eigenvalues, rtol=1e-10, atol=1e-14)
        assert a[key].trace == pytest.approx(b[key].trace, rel=1e-12)


def test_scaling_the_loss_by_c_scales_eigenvalues_by_c_squared():
    model, ids = tiny(), tokens(6)
    total = compute(model, ids, "model")
    mean = compute(model, ids, "model", per_sample_reduction="mean")  # every sequence has 6 targets: c = 1/6
    torch.testing.assert_close(mean["model"].eigenvalues * 36, total["model"].eigenvalues, rtol=1e-10, atol=1e-14)
    assert mean.metadata["per_sample_reduction"] == "mean"
    G, _ = reference_rows(model, ids)
    scaled = FisherSpectral().compute_fisher_spectrum(None, precomputed_gradients={"w": 2.5 * G}, block_structure="model")
    torch.testing.assert_close(scaled["model"].eigenvalues, 6.25 * total["model"].eigenvalues, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------- paths that must agree

@pytest.mark.parametrize("center", [False, True])
def test_streaming_equals_in_memory(center):
    model, ids = tiny(), tokens(6)
    a = compute(model, ids, center=center)
    budget = 6 * 8 * 30 / 2**20  # 30 columns per slice: blocks are split across many passes
    b = compute(model, ids, center=center, streaming=True, stream_budget_mb=budget)
    assert b.metadata["streaming"]["passes"] > len(b.blocks)
    assert b.metadata["streaming"]["slice_width"] == 30
    for key in a.blocks:
        torch.testing.assert_close(a[key].eigenvalues, b[key].eigenvalues, rtol=1e-10, atol=1e-14)
    assert b.whole_model.trace == pytest.approx(a.whole_model.trace, rel=1e-12)
    torch.testing.assert_close(a.whole_model.eigenvalues, b.whole_model.eigenvalues, rtol=1e-10, atol=1e-14)


def test_precomputed_gradients_equal_the_model_path():
    model, ids = tiny(), tokens(5)
    G, names = reference_rows(model, ids)
    cols = columns(model)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    per_sample = [{n: G[i, cols[n]].reshape(shapes[n]) for n in names} for i in range(5)]
    a = compute(model, ids)
    b = FisherSpectral().compute_fisher_spectrum(model, None, precomputed_gradients=per_sample, block_structure="layer_type")
    assert list(a.blocks) == list(b.blocks)
    for key in a.blocks:
        torch.testing.assert_close(a[key].eigenvalues, b[key].eigenvalues, rtol=1e-10, atol=1e-14)
    assert b.metadata["gradient_source"] == "precomputed" and b.metadata["sample_unit"] is None


def test_subsampled_block_is_the_principal_submatrix():
    model, ids = tiny(), tokens(10)
    res = compute(model, ids, "layer", max_params_per_block=25, seed=3)
    G, _ = reference_rows(model, ids)
    for key, b in res.blocks.items():
        cols = block_columns(model, res, key)
        if b.n_params <= 25:
            assert b.subsample_seed is None and b.eigenvalues_of == "F"
            continue
        seed = blk.block_seed(3, key)
        S = blk.subsample_indices(b.n_params, 25, seed)
        assert b.subsample_seed == seed and b.n_params_used == 25
        assert b.subsample_fraction == pytest.approx(25 / b.n_params)
        assert b.eigenvalues_of.startswith("principal submatrix")
        Gs = G[:, cols[S]]
        assert_top(b.eigenvalues, dense_spectrum(Gs))
        # Cauchy interlacing: a principal submatrix never has larger eigenvalues
        full = dense_spectrum(G[:, cols])
        assert bool((b.eigenvalues <= full[: b.eigenvalues.numel()] * (1 + 1e-10)).all())
    sub = res.metadata["subsampling"]["blocks"]
    assert sub and all(v["seed"] == blk.block_seed(3, k) for k, v in sub.items())
    streamed = compute(model, ids, "layer", max_params_per_block=25, seed=3, streaming=True,
                       stream_budget_mb=10 * 8 * 7 / 2**20)
    for key in res.blocks:
        torch.testing.assert_close(res[key].eigenvalues, streamed[key].eigenvalues, rtol=1e-10, atol=1e-14)


def test_stable_hash_is_sha1_based():
    import hashlib

    expected = int(hashlib.sha1(b"layer_0").hexdigest(), 16) % (10**9 + 7)
    assert blk.stable_hash("layer_0") == expected
    assert blk.block_seed(5, "layer_0") == (5 + expected) % (2**31 - 1)
    a = blk.subsample_indices(1000, 10, 42)
    assert torch.equal(a, blk.subsample_indices(1000, 10, 42)) and torch.equal(a, a.sort().values)
    assert blk.subsample_indices(10, 10, 0) is None


# ---------------------------------------------------------------------------- solvers

def test_svd_lowrank_top_k_matches_eigvalsh():
    model, ids = tiny(), tokens(16)  # q = k + 10 = 13 < N: a genuinely randomized subspace
    exact = compute(model, ids)
    approx = compute(model, ids, top_k_eigenvalues=3)
    assert approx.metadata["solver"]["name"] == "svd_lowrank" and not approx.metadata["solver"]["exact"]
    for key, b in approx.blocks.items():
        assert b.eigenvalues.numel() == min(3, b.n_params)
        torch.testing.assert_close(b.eigenvalues, exact[key].eigenvalues[: b.eigenvalues.numel()], rtol=1e-8, atol=1e-14)
        assert b.trace == pytest.approx(exact[key].trace, rel=1e-12)  # trace is exact for every solver
        assert b.condition_number != b.condition_number and b.effective_rank != b.effective_rank  # NaN
    streamed = compute(model, ids, top_k_eigenvalues=3, streaming=True, stream_budget_mb=16 * 8 * 20 / 2**20)
    for key, b in streamed.blocks.items():
        torch.testing.assert_close(b.eigenvalues, approx[key].eigenvalues, rtol=1e-8, atol=1e-14)


def test_svd_guard_when_k_below_one(caplog):
    with caplog.at_level(logging.WARNING):
        values, info = sol.topk_svd(torch.zeros(4, 0, dtype=torch.float64), 5, 0, 10, 2, torch.device("cpu"), True)
    assert values.numel() == 0 and info.k_used == 0 and "k=0" in caplog.text
    with pytest.raises(PracError):
        SpectralConfig(top_k_eigenvalues=0)


def test_metrics_on_a_known_spectrum():
    lam = torch.tensor([4.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    m = sol.spectrum_metrics(lam, trace=8.0, gram_size=4, exact=True)
    assert m.condition_number == pytest.approx(2.0) and m.numerical_rank == 3
    p = torch.tensor([0.5, 0.25, 0.25])
    assert m.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert m.stable_rank == pytest.approx(2.0)
    zero = sol.spectrum_metrics(torch.zeros(3, dtype=torch.float64), 0.0, 3, True)
    assert zero.condition_number != zero.condition_number and zero.effective_rank == 0.0 and zero.numerical_rank == 0


def test_eigvalsh_failure_falls_back_to_recorded_jitter(monkeypatch):
    real = torch.linalg.eigvalsh
    calls = {"n": 0}

    def flaky(K):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return real(K)

    monkeypatch.setattr(sol, "_eigvalsh", flaky)
    K = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    values, info = sol.eigvalsh_descending(K, torch.device("cpu"), failure_jitter=1e-9)
    assert info.jitter == pytest.approx(1e-9) and len(info.attempts) == 2 and "failed" in info.attempts[0]
    torch.testing.assert_close(values, torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # no failure: no jitter at all (the spectrum is not regularised)
    _, clean = sol.eigvalsh_descending(K, torch.device("cpu"), failure_jitter=1e-3)
    assert clean.jitter == 0.0 and not clean.cpu_retry


# ---------------------------------------------------------------------------- edge cases and metadata

def test_single_sample():
    model, ids = tiny(), tokens(1)
    res = compute(model, ids)
    for b in res.blocks.values():
        assert b.eigenvalues.numel() == 1
        assert float(b.eigenvalues[0]) == pytest.approx(b.trace, rel=1e-12)
        assert b.condition_number == pytest.approx(1.0) and b.effective_rank == pytest.approx(1.0)
    centered = compute(model, ids, center=True)
    assert all(b.trace == 0.0 and b.numerical_rank == 0 for b in centered.blocks.values())


def test_empty_precomputed_gradients_give_empty_result_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        res = FisherSpectral().compute_fisher_spectrum(None, None, precomputed_gradients=[])
    assert len(res) == 0 and res.whole_model is None and res.metadata["n_samples_used"] == 0
    assert "empty" in caplog.text
    json.dumps(res.to_dict(), allow_nan=False)
    assert len(FisherSpectral().compute_fisher_spectrum(None, precomputed_gradients={})) == 0


def test_block_with_no_parameters(caplog):
    G = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {"layers.0.mlp.weight": G, "layers.0.attn.bias": torch.zeros(4, 0, dtype=torch.float64)}
    with caplog.at_level(logging.WARNING):
        res = FisherSpectral().compute_fisher_spectrum(None, precomputed_gradients=grads, block_structure="layer_type")
    empty = res["layer_0.attention"]
    assert empty.n_params == 0 and empty.eigenvalues.numel() == 0 and empty.trace == 0.0
    assert empty.condition_number != empty.condition_number and "no parameters" in caplog.text
    torch.testing.assert_close(res.whole_model.eigenvalues, res["layer_0.mlp"].eigenvalues)


def test_callable_blocks_and_exclusion():
    model, ids = tiny(), tokens(4)

    def only_mlp(name, tensor):
        return "mlp_weights" if ".mlp." in name and name.endswith("weight") else None

    res = compute(model, ids, only_mlp)
    assert list(res.blocks) == ["mlp_weights"]
    assert res.metadata["block_structure"].startswith("callable:")
    assert "embed_tokens.weight" in res.metadata["excluded_parameters"]
    with pytest.raises(PracError):
        compute(model, ids, lambda n, t: None)


def test_mc_fisher_is_seeded_and_recorded():
    model, ids = tiny(), tokens(6)
    a = compute(model, ids, "model", fisher_type="mc", seed=7)
    b = compute(model, ids, "model", fisher_type="mc", seed=7, chunk_size=1, gradient_engine="loop")
    c = compute(model, ids, "model", fisher_type="mc", seed=8)
    emp = compute(model, ids, "model")
    torch.testing.assert_close(a["model"].eigenvalues, b["model"].eigenvalues, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(a["model"].eigenvalues, c["model"].eigenvalues)
    assert not torch.allclose(a["model"].eigenvalues, emp["model"].eigenvalues)
    assert a.metadata["fisher_type"] == "mc" and "seed 7" in a.metadata["targets"]


def test_mc_labels_keep_ignored_positions():
    from prac.spectral import gradients as grd

    model, ids = tiny(), tokens(3)
    labels = ids.clone()
    labels[0, 2] = -100
    samples, _ = grd.make_samples({"input_ids": ids, "labels": labels})
    drawn = grd.sample_mc_labels(model, samples, True, 0, 2)
    assert drawn[0, 2] == -100 and bool(((drawn[:, 1:] >= 0) | (drawn[:, 1:] == -100)).all())
    assert torch.equal(drawn[:, 0], labels[:, 0])


def test_eval_mode_and_flags_are_restored():
    model, ids = tiny(dropout=0.5), tokens(4)
    model.train()
    res = compute(model, ids, "model", use_deterministic=True)
    assert model.training and res.metadata["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    again = compute(model, ids, "model")  # dropout off during the computation either way
    torch.testing.assert_close(res["model"].eigenvalues, again["model"].eigenvalues, rtol=1e-12, atol=1e-15)
    assert any("eval()" in n for n in res.metadata["notes"])


def test_n_samples_and_masks_are_recorded():
    model, ids = tiny(), tokens(5)
    res = FisherSpectral().compute_fisher_spectrum(model, ids, n_samples=3, block_structure="model")
    m = res.metadata
    assert m["n_samples_requested"] == 3 and m["n_sequences_used"] == 3 and m["n_samples_used"] == 3
    assert m["n_tokens"] == 3 * 6 and m["normalization"] == "1/N" and m["sample_unit"] == "sequence"
    assert m["per_sample_reduction"] == "sum" and m["fisher_type"] == "empirical"
    assert {"torch", "prac", "numpy"} <= set(m["versions"])
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    masked = FisherSpectral().compute_fisher_spectrum(model, {"input_ids": ids, "attention_mask": mask},
                                                      block_structure="model")
    assert masked.metadata["n_tokens"] == 5 * 6 - 3


def test_result_is_json_safe_and_round_trips(tmp_path):
    model, ids = tiny(), tokens(4)
    res = compute(model, ids, top_k_eigenvalues=2)  # NaN condition numbers must become null
    text = json.dumps(res.to_dict(), allow_nan=False)
    back = SpectralResult.from_dict(json.loads(text))
    assert list(back.blocks) == list(res.blocks)
    torch.testing.assert_close(back["layer_0.mlp"].eigenvalues, res["layer_0.mlp"].eigenvalues)
    res.save_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("block,") and len(lines) == 1 + len(res.blocks) + 1


def test_config_validation():
    for bad in [dict(sample_unit="word"), dict(fisher_type="true"), dict(max_params_per_block=0),
                dict(gradient_engine="jit"), dict(eigensolve_device="tpu"), dict(chunk_size=0)]:
        with pytest.raises(PracError):
            SpectralConfig(**bad)
