"""Block-wise reconstruction (--reconstruct): survivors tuned to the dense model's block outputs, masks
fixed, judged on held-out sequences, the same in one process and two."""

from __future__ import annotations

import pytest
import torch

from prac.core.errors import PracError
from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig, prune_model
from prac.engine.reconstruct import ReconstructConfig
from prac.methods.patterns import NM, Unstructured
from prac.model.stats import StatsSpec
from prac.model.units import model_units
from tests.conftest import VOCAB, make_tiny_model, state_hash

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (16, 32))


def masks(model) -> dict[str, torch.Tensor]:
    return {name: unit.read() == 0 for _b, _i, units in model_units(model) for name, unit in units.items()}


def run(arch, calib, mode="block", method="wanda", pattern=None, **settings):
    if pattern is None:
        pattern = Unstructured(0.6)
    settings = {"epochs": 4, "minibatches": 4, **settings}  # fewer steps than the defaults: a tiny model
    model = make_tiny_model(arch)
    cfg = PruneConfig(method=method, pattern=pattern,
                      engine=EngineConfig(batch_size=2, reconstruct=ReconstructConfig(mode, **settings)))
    return model, prune_model(model, calib, cfg, CPU)


@pytest.mark.parametrize("mode", ["block", "sublayer"])
def test_tuning_lowers_the_fitted_block_error_and_keeps_every_mask(mode, calib):
    reference = make_tiny_model("mistral")
    prune_model(reference, calib, PruneConfig(pattern=Unstructured(0.6), engine=EngineConfig(batch_size=2)), CPU)
    model, outcome = run("mistral", calib, mode, lr=1e-3, holdout=0.0)
    assert [r.block for r in outcome.reconstruction] == ["model.layers.0", "model.layers.1"]
    for r in outcome.reconstruction:
        assert r.fit_after < r.fit_before and r.kept and r.steps == 4 * 4 and r.masks_kept
        assert r.heldout_before is None and r.sublayers == ([] if mode == "block" else ["self_attn", "mlp"])
        assert r.estimated_memory_bytes > 0  # prac.engine.memory.reconstruct_bytes, computed on the CPU too
    before, after = masks(reference), masks(model)
    # block 0 is pruned on the same inputs: the same masks after tuning, and nothing else zero (the later
    # blocks are calibrated on the tuned block 0's outputs, so their masks differ)
    first = [n for n in before if ".layers.0." in n]
    assert first and all(torch.equal(before[n], after[n]) for n in first)
    assert all(int(after[r.name].sum()) == round(r.sparsity * r.numel) for r in outcome.layers)
    assert state_hash(model) != state_hash(reference)


def test_n_m_stays_n_m_and_an_moe_model_is_tuned_with_its_experts(calib):
    model, outcome = run("mixtral", calib, method="sparsegpt", pattern=NM(2, 4), lr=1e-3)
    for name, mask in masks(model).items():
        kept = (~mask).reshape(mask.shape[0], -1, 4).sum(-1)
        assert int(kept.max()) <= 2, name
    assert all(r.masks_kept for r in outcome.reconstruction)
    assert any(".experts." in r.name for r in outcome.layers)


def test_a_block_whose_held_out_error_rises_keeps_its_weights(calib):
    # the reference: the same prune on the same split (the held-out quarter apart), without tuning
    reference = make_tiny_model("mistral")
    prune_model(reference, calib, PruneConfig(pattern=Unstructured(0.6), collect=StatsSpec(holdout=0.25),
                                              engine=EngineConfig(batch_size=2)), CPU)
    model, outcome = run("mistral", calib, lr=10.0, optimizer="sgd", holdout=0.25)
    assert outcome.reconstruction and not any(r.kept for r in outcome.reconstruction)
    assert all(r.stopped_early and r.epochs == 1 for r in outcome.reconstruction)
    # the held-out error rose in the first epoch (stopped_early), so the best weights are the pre-tuning
    # ones: they are restored, and the errors measured after are exactly those measured before
    assert all(r.heldout_after == r.heldout_before and r.fit_after == r.fit_before for r in outcome.reconstruction)
    assert state_hash(model) == state_hash(reference)


def test_held_out_sequences_decide_and_are_never_fitted(calib):
    _, outcome = run("mistral", calib, lr=1e-3, holdout=0.25)
    for r in outcome.reconstruction:
        assert r.heldout_before is not None and r.heldout_after is not None
        assert r.kept == (r.heldout_after < r.heldout_before)


def test_patience_tunes_on_past_a_worse_epoch_and_keeps_the_best(calib):
    """The same trajectory judged with more patience: the runs agree up to the first stop, the patient
    one runs on and ends no worse (its best is over more epochs); patience 1 is the former rule."""
    short = run("mistral", calib, lr=3e-2, holdout=0.25, epochs=6)[1].reconstruction
    long = run("mistral", calib, lr=3e-2, holdout=0.25, epochs=6, patience=6)[1].reconstruction
    assert any(r.stopped_early and r.epochs < 6 for r in short)
    first = short[0], long[0]  # block 0 sees the same inputs in both runs
    assert first[1].epochs >= first[0].epochs and first[1].digests[:len(first[0].digests)] == first[0].digests
    assert first[1].heldout_after <= first[0].heldout_after
    assert any(b.epochs > a.epochs for a, b in zip(short, long))


def test_reruns_are_bit_identical(calib):
    hashes = [state_hash(run("qwen2", calib, "sublayer", lr=1e-3)[0]) for _ in range(2)]
    assert hashes[0] == hashes[1]


def test_bad_settings_are_one_line_errors():
    for bad in ({"mode": "layer"}, {"epochs": 0}, {"lr": -1.0}, {"optimizer": "lbfgs"}, {"holdout": 1.0},
                {"patience": 0}):
        with pytest.raises(PracError):
            ReconstructConfig(**{"mode": "block", **bad})


def test_cli_reports_the_reconstruction_and_refuses_settings_without_it(tiny_model_dir, small_text, tmp_path, capsys):
    import json

    from prac.cli import main

    args = ["prune", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text), "--nsamples", "8",
            "--seqlen", "32", "--eval", "none", "--no-progress"]
    assert main([*args, "--reconstruct-epochs", "2"]) == 2
    assert "without --reconstruct" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main([*args, "--reconstruct", "block", "--reconstruct-epochs", "2", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "block reconstruction: kept in" in out
    data = json.loads(report.read_text())
    assert len(data["reconstruction"]) == 2 and data["summary"]["reconstruction"]["blocks"] == 2
    assert "reconstruct" in data["summary"]["phase_seconds"]


@pytest.mark.slow
def test_two_processes_tune_like_one(tiny_model_dir, small_text, tmp_path):
    """Gradients all-reduced: the two-process weights equal one process's to float tolerance."""
    from safetensors.torch import load_file

    from tests.test_distributed import _prac

    weights = {}
    for world in (1, 2):
        cwd = tmp_path / f"w{world}"
        cwd.mkdir()
        proc = _prac(["prune", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text), "--nsamples", "8",
                      "--seqlen", "32", "--batch-size", "2", "--eval", "none", "--no-progress", "--reconstruct",
                      "sublayer", "--reconstruct-lr", "1e-3", "--save", "out"], world, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[world] = load_file(str(cwd / "out" / "model.safetensors"))
    for name, w in weights[1].items():
        torch.testing.assert_close(weights[2][name], w, rtol=1e-4, atol=1e-6)
        assert torch.equal(weights[2][name] == 0, w == 0), name


def test_no_more_minibatches_than_calibration_batches(calib):
    """16 sequences in batches of 2 are 8 batches: asking for 100 minibatches makes 8 steps an epoch
    (an empty step would still move the weights through the optimiser's momentum)."""
    _, outcome = run("mistral", calib, lr=1e-3, holdout=0.0, epochs=1, minibatches=100)
    assert [r.steps for r in outcome.reconstruction] == [8, 8]


def test_the_token_loss_weighs_every_token_alike_and_the_total_loss_does_not():
    """One token with 1000x the others' scale (a "massive activation", as the first token of every window
    in SmolLM2's middle blocks): the per-token objective is the mean of the tokens' relative errors,
    whatever their scales; the total objective is that one token's error."""
    from prac.engine.reconstruct import _Problem

    torch.manual_seed(0)
    target = torch.randn(2, 8, 16)
    pred = target + 0.1 * torch.randn(2, 8, 16)
    per_token = ((pred - target).square().sum(-1) / target.square().sum(-1))  # [2, 8]
    big_t, big_p = target.clone(), pred.clone()
    big_t[:, 0] *= 1000
    big_p[:, 0] = big_t[:, 0] * 1.001  # a 1e-6 relative error on the massive token
    token = _Problem.__new__(_Problem)
    token.tokenwise = True
    total = _Problem.__new__(_Problem)
    total.tokenwise = False

    def objective(problem, t, p):
        err, norm = problem._norms(t, p)
        return float(err.sum() / norm.sum())

    expected = torch.cat([torch.full((2, 1), 1e-6), per_token[:, 1:]], dim=1).mean()
    assert objective(token, big_t, big_p) == pytest.approx(float(expected), rel=1e-4)
    assert objective(token, target, pred) == pytest.approx(float(per_token.mean()), rel=1e-5)
    # the total objective: the massive token's 1e-6 drowns the other tokens' ~1e-2
    assert objective(total, big_t, big_p) < 1e-5 < objective(token, big_t, big_p)


def test_the_loss_is_recorded_and_total_reproduces_its_own_runs(calib):
    _m1, token = run("mistral", calib, lr=1e-3, holdout=0.0)
    m2, total = run("mistral", calib, lr=1e-3, holdout=0.0, loss="total")
    m3, again = run("mistral", calib, lr=1e-3, holdout=0.0, loss="total")
    assert {r.loss for r in token.reconstruction} == {"token"} and {r.loss for r in total.reconstruction} == {"total"}
    assert state_hash(m2) == state_hash(m3)
    assert [r.fit_after for r in total.reconstruction] == [r.fit_after for r in again.reconstruction]
    assert [r.fit_before for r in token.reconstruction] != [r.fit_before for r in total.reconstruction]
    with pytest.raises(PracError, match="reconstruct loss"):
        ReconstructConfig("block", loss="mean")
