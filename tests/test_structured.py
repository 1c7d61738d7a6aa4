"""Structured shrinking (--intermediate-size, --num-key-value-heads): the selection refits the consumer
exactly on what it keeps and beats simpler selections; the shrunk model is a standard folder of its
family that reloads with plain from_pretrained to the very logits, and generates; bad shapes are one line."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import pytest
import torch

from prac.core.errors import PracError
from prac.engine.config import EngineConfig
from prac.engine.structure import shrink_model
from prac.methods.structured import select_channels
from prac.model.shrink import Shape, check_shrinkable
from tests.conftest import VOCAB, make_tiny_model

CPU = torch.device("cpu")


def problem(seed: int = 0, n: int = 512, width: int = 12, out: int = 6):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64)
    x = torch.randn(n, width, generator=g, dtype=torch.float64) @ mix * torch.rand(width, generator=g, dtype=torch.float64)
    w = torch.randn(out, width, generator=g, dtype=torch.float64)
    return x, w, x.T @ x / n


def refit_error(x: torch.Tensor, w: torch.Tensor, kept: list[int]) -> float:
    """The output error left by the least-squares refit of ``w`` on the columns ``kept``, from the data."""
    y = x @ w.T
    sol = torch.linalg.lstsq(x[:, kept], y).solution
    return float((x[:, kept] @ sol - y).square().sum() / x.shape[0])


def test_the_kept_weight_is_the_exact_refit_and_the_rest_is_zero():
    x, w, h = problem()
    chosen = select_channels(w, h, keep=5, damping=0.0)
    kept = chosen.kept.tolist()
    assert len(kept) == 5 and kept == sorted(kept)
    removed = [i for i in range(12) if i not in kept]
    assert bool((chosen.weight[:, removed] == 0).all())
    y = x @ w.T
    sol = torch.linalg.lstsq(x[:, kept], y).solution.T
    torch.testing.assert_close(chosen.weight[:, kept], sol, rtol=1e-8, atol=1e-9)
    assert chosen.error == pytest.approx(refit_error(x, w, kept), rel=1e-8)


def test_the_greedy_choice_beats_magnitude_and_activation_choices_and_is_near_the_best():
    worse_than_best = []
    for seed in range(6):
        x, w, h = problem(seed)
        chosen = select_channels(w, h, keep=5, step=1, damping=0.0)
        mine = refit_error(x, w, chosen.kept.tolist())
        # Wanda-sp (column norm times input norm) and Minitron (mean activation) choose without the refit
        wanda_sp = (w.norm(dim=0) * x.norm(dim=0)).argsort(descending=True)[:5].tolist()
        minitron = x.abs().mean(dim=0).argsort(descending=True)[:5].tolist()
        assert mine <= refit_error(x, w, wanda_sp) + 1e-12 and mine <= refit_error(x, w, minitron) + 1e-12
        best = min(refit_error(x, w, list(k)) for k in itertools.combinations(range(12), 5))
        worse_than_best.append(mine / best)
    assert max(worse_than_best) < 1.25  # greedy OBS: the exhaustive optimum, or close to it


def test_groups_of_columns_are_kept_or_removed_whole():
    x, w, h = problem(width=12)
    chosen = select_channels(w, h, keep=2, width=4, damping=0.0)
    assert chosen.info["groups"] == 3 and len(chosen.kept) == 2
    cols = [g * 4 + j for g in chosen.kept.tolist() for j in range(4)]
    assert bool((chosen.weight[:, [c for c in range(12) if c not in cols]] == 0).all())
    assert chosen.error == pytest.approx(refit_error(x, w, cols), rel=1e-8)
    best = min(refit_error(x, w, [g * 4 + j for g in k for j in range(4)]) for k in itertools.combinations(range(3), 2))
    assert chosen.error == pytest.approx(best, rel=1e-8)  # two of three groups: one removal, the cheapest


def _configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {"llama": LlamaConfig(**common), "mistral": MistralConfig(**common),
            "qwen2": Qwen2Config(tie_word_embeddings=True, **common), "qwen3": Qwen3Config(head_dim=16, **common),
            "gemma3": Gemma3TextConfig(head_dim=16, sliding_window=16, **common)}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_a_shrunk_model_reloads_with_plain_transformers_to_the_same_logits_and_generates(arch, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()
    calib = torch.randint(0, VOCAB, (8, 32))
    x = torch.randint(0, VOCAB, (2, 16))
    outcome = shrink_model(model, calib, Shape(intermediate_size=48, num_key_value_heads=1), EngineConfig(batch_size=4), CPU)
    changes = outcome.config_changes
    assert changes["intermediate_size"] == [128, 48] and changes["num_key_value_heads"] == [2, 1]
    assert changes["num_attention_heads"] == [4, 2]
    assert outcome.parameters_after < outcome.parameters_before
    assert [(r.block, r.part) for r in outcome.records] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    for block in model.model.layers:
        assert block.mlp.down_proj.in_features == 48 and block.self_attn.o_proj.in_features == 2 * 16
    with torch.no_grad():
        shrunk = model(x).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (48, 2, 1)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, shrunk)
    out = again.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_the_block_engine_propagates_what_the_sliced_block_computes(one_thread):
    """The pass zeroes the removed columns and propagates that; slicing them out afterwards changes
    nothing but rounding (float64)."""
    torch.manual_seed(0)
    model = make_tiny_model("mistral").double()
    calib = torch.randint(0, VOCAB, (8, 32))
    x = torch.randint(0, VOCAB, (2, 16))
    from prac.engine import structure

    zeroed = {}
    real_slice = structure._slice

    def capture(m, step, shape):
        with torch.no_grad():
            zeroed["logits"] = m(x).logits.clone()
        real_slice(m, step, shape)

    structure._slice = capture
    try:
        shrink_model(model, calib, Shape(intermediate_size=40), EngineConfig(batch_size=4), CPU)
    finally:
        structure._slice = real_slice
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, zeroed["logits"], rtol=1e-10, atol=1e-10)


def test_shapes_a_config_cannot_express_are_one_line_errors():
    from transformers import MixtralConfig

    cfg = _configs()["mistral"]
    with pytest.raises(PracError, match="--intermediate-size 129: the model has intermediate_size = 128"):
        check_shrinkable(cfg, Shape(intermediate_size=129))
    with pytest.raises(PracError, match="--num-key-value-heads 3"):
        check_shrinkable(cfg, Shape(num_key_value_heads=3))
    moe = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4)
    with pytest.raises(PracError, match="supports llama"):
        check_shrinkable(moe, Shape(intermediate_size=64))
    check_shrinkable(moe, Shape())  # nothing asked: nothing to refuse


def test_cli_shrinks_saves_a_standard_folder_and_refuses_bad_shapes_before_loading(tiny_model_dir, small_text, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("qwen2")
    base = [sys.executable, "-m", "prac", "prune", "--model", str(model_dir), "--calib", str(small_text),
            "--nsamples", "8", "--seqlen", "32", "--eval", "none", "--no-progress"]
    out = tmp_path / "small"
    done = subprocess.run([*base, "--intermediate-size", "64", "--save", str(out), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "structure: block parameters" in done.stdout and "intermediate_size 128 -> 64" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    s = report["summary"]["structure"]
    assert s["config_changes"] == {"intermediate_size": [128, 64]} and s["parameters_after"] < s["parameters_before"]
    assert report["summary"]["sparsity"] == 0.0  # structure alone: no --sparsity given
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 64 and model.model.layers[0].mlp.down_proj.in_features == 64
    for bad, message in ((["--intermediate-size", "4096"], "keep between 1 and 128"),
                         (["--num-key-value-heads", "1", "--reconstruct", "sublayer"], "must be block"),
                         (["--target-params", "1.5"], "--target-params must be in (0, 1)"),
                         (["--target-params", "0.5", "--intermediate-size", "64"], "give one or the other"),
                         (["--intermediate-size", "64", "--search-nsamples", "8"], "give it with --target-params"),
                         (["--structure-damping", "0.1"], "give it with --intermediate-size"),
                         (["--intermediate-size", "64", "--structure-damping", "0"], "must be > 0"),
                         (["--num-hidden-layers", "3"], "keep between 1 and 2")):
        refused = subprocess.run([*base, *bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and message in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def _identity_block(model, i: int) -> None:
    """Block ``i`` passes its input on unchanged (its attention and MLP add exact zeros)."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_dropping_blocks_removes_the_one_that_changes_the_held_out_output_least(arch, tmp_path, one_thread):
    """A block made an identity changes nothing when removed: it is the one dropped (score 0), the
    model then gives the very logits it gave, and the folder reloads with its per-layer lists cut."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _configs()[arch]
    cfg.num_hidden_layers = 4
    cfg.layer_types = (["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
                       if arch == "gemma3" else ["full_attention"] * 4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    _identity_block(model, 2)
    calib = torch.randint(0, VOCAB, (8, 32))
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        before = model(x).logits
    outcome = shrink_model(model, calib, Shape(num_hidden_layers=3), EngineConfig(batch_size=4), CPU, holdout=0.25)
    assert outcome.dropped == [2] and outcome.config_changes["num_hidden_layers"] == [4, 3]
    first = outcome.depth[0]
    assert first.blocks == [0, 1, 2, 3] and first.scores[2] == 0.0 and min(first.scores[:2] + first.scores[3:]) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 3 and len(again.model.layers) == 3
    if arch == "gemma3":
        assert again.config.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_the_held_out_sequences_never_reach_the_width_selection(one_thread):
    """Changing only the held-out sequences leaves every kept channel and every refitted weight as it was."""
    calib = torch.randint(0, VOCAB, (8, 32))
    from prac.model.stats import holdout_rows

    held = holdout_rows(8, 0.25, 0)
    other = calib.clone()
    other[held] = torch.randint(0, VOCAB, (int(held.sum()), 32), generator=torch.Generator().manual_seed(9))
    runs = []
    for tokens in (calib, other):
        model = make_tiny_model("mistral").double()
        outcome = shrink_model(model, tokens, Shape(intermediate_size=40), EngineConfig(batch_size=4), CPU,
                               holdout=0.25, seed=0)
        runs.append(([r.kept for r in outcome.records], [b.mlp.down_proj.weight.clone() for b in model.model.layers]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    model = make_tiny_model("mistral").double()  # while every sequence in the fit changes the choice
    outcome = shrink_model(model, other, Shape(intermediate_size=40), EngineConfig(batch_size=4), CPU)
    assert not all(torch.equal(a, b.mlp.down_proj.weight) for a, b in zip(runs[0][1], model.model.layers))


def test_tuning_after_the_structured_pass_lowers_the_block_error_and_keeps_the_shape(small_text, tokenizer, one_thread):
    """On the bundled (trained) model: tuned blocks are kept only with a lower held-out error, and the
    removed channels stay exact zeros through the tuning, so the slicing leaves the asked shape."""
    from transformers import AutoModelForCausalLM

    from prac.engine.reconstruct import ReconstructConfig
    from prac.io import assets
    from prac.io.data import load_calibration

    calib = load_calibration(str(small_text), tokenizer, nsamples=16, seqlen=64, seed=0).input_ids
    model = AutoModelForCausalLM.from_pretrained(assets.DEFAULT_MODEL).eval()
    tuned = EngineConfig(batch_size=4, reconstruct=ReconstructConfig(mode="block", epochs=4, minibatches=4, lr=1e-3))
    outcome = shrink_model(model, calib, Shape(intermediate_size=192, num_key_value_heads=2), tuned, CPU, holdout=0.25)
    records = outcome.reconstruction
    assert len(records) == 4 and sum(r.kept for r in records) >= 2
    for r in records:
        assert r.heldout_before is not None
        if r.kept:
            assert r.heldout_after < r.heldout_before and r.fit_after < r.fit_before
    for block in model.model.layers:
        assert block.mlp.down_proj.weight.shape[1] == 192 and block.self_attn.k_proj.weight.shape[0] == 2 * 32
    assert outcome.to_dict()["config_changes"]["intermediate_size"] == [768, 192]


def test_target_params_tries_shapes_under_the_budget_and_keeps_the_best_scored(one_thread):
    from prac.engine.structure_search import TOLERANCE, BlockBudget, candidate_shapes

    model = make_tiny_model("mistral")
    budget = BlockBudget.of(model)
    assert budget.dense == sum(p.numel() for p in model.model.layers.parameters())
    shapes = candidate_shapes(budget, 0.6)
    assert len(shapes) >= 2 and len(set(shapes)) == len(shapes)
    for s in shapes:
        kept = budget.params(s.num_hidden_layers or 2, s.num_key_value_heads or 2, s.intermediate_size or 128)
        assert kept <= 0.6 * budget.dense * (1 + TOLERANCE)
    calib = torch.randint(0, VOCAB, (16, 32))
    outcome = shrink_model(model, calib, Shape(target_params=0.6), EngineConfig(batch_size=4), CPU, holdout=0.25)
    search = outcome.search.to_dict()
    scores = [c["heldout_change"] for c in search["candidates"]]
    best = search["candidates"][scores.index(min(scores))]
    assert search["chosen"] == {k: v for k, v in best.items() if k in ("intermediate_size", "num_key_value_heads",
                                                                         "num_hidden_layers")}
    assert outcome.parameters_after == sum(p.numel() for p in model.model.layers.parameters())
    assert outcome.parameters_after / outcome.parameters_before == pytest.approx(best["kept_share"], abs=1e-6)
    assert outcome.parameters_after <= 0.6 * outcome.parameters_before * (1 + TOLERANCE)
    fixed = candidate_shapes(budget, 0.6, layers_fixed=2, kv_fixed=1)  # what the user gave is kept
    assert fixed and all(s.num_hidden_layers == 2 and s.num_key_value_heads == 1 for s in fixed)
    # with a quantization group the MLP widths tried are multiples of it
    assert all(s.intermediate_size is None or s.intermediate_size % 32 == 0 for s in candidate_shapes(budget, 0.6, 32))


def test_the_search_fits_each_candidate_on_at_most_search_nsamples_sequences_and_judges_on_every_held_one(one_thread):
    """Fitted sequences past the cap change no candidate's score; every held-out one judges; a search
    without the cap fits them all (so it sees the change)."""
    from prac.engine.structure_search import search_shape
    from prac.model.stats import holdout_rows

    calib = torch.randint(0, VOCAB, (16, 32))
    held = holdout_rows(16, 0.25, 0)
    fitted = (~held).nonzero().flatten()
    other = calib.clone()  # only the fitted sequences past the first 5 differ
    other[fitted[5:]] = torch.randint(0, VOCAB, (len(fitted) - 5, 32), generator=torch.Generator().manual_seed(3))
    model = make_tiny_model("mistral").double()

    def scores(tokens, cap):
        s = search_shape(model, tokens, 0.6, EngineConfig(batch_size=4), CPU, 0.25, 0, max_fitted=cap)
        return s, [c["heldout_change"] for c in s.candidates]

    capped, a = scores(calib, 5)
    assert capped.fitted_sequences == 5 and capped.held_out_sequences == 4 and len(a) >= 2
    assert a == scores(other, 5)[1]
    assert scores(calib, None)[0].fitted_sequences == 12
    assert scores(calib, None)[1] != scores(other, None)[1]
    before = [p.clone() for p in model.parameters()]  # the search leaves the model as it was
    scores(calib, 5)
    assert all(torch.equal(x, y) for x, y in zip(before, model.parameters()))


def test_explicit_held_out_rows_are_those_of_the_draw_when_equal_and_must_match_the_calibration():
    from prac.model.stats import StatsSpec, holdout_rows

    drawn = holdout_rows(10, 0.3, 4)
    assert torch.equal(StatsSpec(holdout=0.3, seed=4).held_rows(10), drawn)
    given = StatsSpec(holdout=0.3, seed=4, held=tuple([True] + [False] * 9))
    assert given.held_rows(10).tolist() == [True] + [False] * 9
    assert StatsSpec(held=(False,) * 10).held_rows(10) is None
    assert StatsSpec().union(given).held == given.held
    with pytest.raises(ValueError, match="held-out flags for 10 sequences, calibration has 8"):
        given.held_rows(8)
    calib = torch.randint(0, VOCAB, (8, 32))
    mine = torch.tensor([True, True] + [False] * 6)
    assert not torch.equal(mine, holdout_rows(8, 0.25, 0))
    other = calib.clone()  # only the rows held out explicitly differ
    other[:2] = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    runs = []
    for tokens, held in ((calib, None), (calib, holdout_rows(8, 0.25, 0)), (calib, mine), (other, mine)):
        model = make_tiny_model("mistral").double()
        shrink_model(model, tokens, Shape(intermediate_size=40), EngineConfig(batch_size=4), CPU, holdout=0.25,
                     held=held)
        runs.append([b.mlp.down_proj.weight for b in model.model.layers])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # the draw's rows, given: the same model
    assert all(torch.equal(a, b) for a, b in zip(runs[2], runs[3]))  # the given rows fit nothing
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_structure_damping_is_the_ridge_of_the_selection_and_of_the_search(one_thread):
    from prac.engine.structure_search import search_shape

    calib = torch.randint(0, VOCAB, (8, 32))
    weights = {}
    for name, shape, damping in (("flag", Shape(intermediate_size=40, damping=0.5), 1e-2),
                                 ("argument", Shape(intermediate_size=40), 0.5),
                                 ("default", Shape(intermediate_size=40), 1e-2)):
        model = make_tiny_model("mistral").double()
        shrink_model(model, calib, shape, EngineConfig(batch_size=4), CPU, damping=damping)
        weights[name] = [b.mlp.down_proj.weight for b in model.model.layers]
    assert all(torch.equal(a, b) for a, b in zip(weights["flag"], weights["argument"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights["flag"], weights["default"]))
    model = make_tiny_model("mistral").double()
    scores = [[c["heldout_change"] for c in search_shape(model, calib, 0.6, EngineConfig(batch_size=4), CPU, 0.25, 0,
                                                         damping=d).candidates] for d in (None, 0.5)]
    assert scores[0] != scores[1]


def test_verify_checks_the_weights_against_the_config(one_thread):
    from prac.jobs.verify import check_shapes
    from prac.model.shrink import shape_mismatches

    model = make_tiny_model("mistral")
    calib = torch.randint(0, VOCAB, (8, 32))
    shrink_model(model, calib, Shape(intermediate_size=48, num_hidden_layers=1), EngineConfig(batch_size=4), CPU,
                 holdout=0.25)
    assert shape_mismatches(model) == []
    check = check_shapes(model, calib)
    assert check.passed and "1 blocks as configured, intermediate 48" in check.detail
    model.config.intermediate_size = 128  # a folder whose config was not updated
    model.config.num_hidden_layers = 2
    found = shape_mismatches(model)
    assert found[0] == "1 blocks, config num_hidden_layers 2" and "mlp.gate_proj is (48, 64)" in found[1]
    assert not check_shapes(model, calib).passed


def test_cli_drops_blocks_tunes_skips_the_empty_prune_pass_and_verify_passes_on_the_folder(tiny_model_dir, small_text,
                                                                                          tmp_path):
    model_dir = tiny_model_dir("mistral")
    out, report_path = tmp_path / "small", tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "prac", "prune", "--model", str(model_dir), "--calib", str(small_text),
                           "--nsamples", "8", "--seqlen", "32", "--eval", "none", "--no-progress",
                           "--num-hidden-layers", "1", "--intermediate-size", "64", "--reconstruct", "block",
                           "--reconstruct-epochs", "2", "--save", str(out), "--report", str(report_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "structured only, no sparsity pass" in done.stdout and "dropped blocks [" in done.stdout
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    s = summary["structure"]
    assert s["config_changes"] == {"intermediate_size": [128, 64], "num_hidden_layers": [2, 1]}
    assert len(s["dropped_blocks"]) == 1 and len(s["depth_rounds"][0]["scores"]) == 2
    assert summary["pruned_layers"] == 0 and summary["prune_seconds"] == 0.0  # no second, empty pass
    assert "structure" in summary["peak_memory_by_phase"] and "prune" not in summary["peak_memory_by_phase"]
    assert summary["reconstruction"]["blocks"] == 1  # the one block left was tuned (or kept its weights)
    assert summary["block_weight_parameters"] == s["parameters_after"] - 2 * 64  # every matrix; not the norms
    verify = subprocess.run([sys.executable, "-m", "prac", "verify", "--model", str(out), "--calib", str(small_text),
                             "--nsamples", "4", "--seqlen", "32"], capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert re.search(r"shapes match the config +PASS +1 blocks as configured, intermediate 64", verify.stdout)
