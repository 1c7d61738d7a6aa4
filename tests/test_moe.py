"""Mixture-of-experts models: every expert pruned on the tokens routed to it, routers left alone, nothing
skipped in silence. Tiny random Mixtral, Qwen3-MoE and Qwen2-MoE (shared expert and its gate) of
transformers' own classes, whose experts are fused 3-D parameters."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from prac.core.errors import PracError
from prac.correction import CorrectionConfig
from prac.engine.config import EngineConfig
from prac.engine.loop import BlockEngine, calibrate
from prac.engine.pipeline import PruneConfig, prune_model
from prac.methods.patterns import NM, Unstructured
from prac.model.experts import expert_views, find_experts
from prac.model.stats import InputStats, StatsSpec
from tests.conftest import VOCAB, make_tiny_model, state_hash

CPU = torch.device("cpu")
MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (8, 64))


def experts_of(model, layer: int):
    (module, layout), = find_experts(model.model.layers[layer]).values()
    return module, layout


def expert_weights(model) -> dict[str, torch.Tensor]:
    """Every expert projection of every block as ``[out, in]`` (read through prac's views)."""
    out = {}
    for i, block in enumerate(model.model.layers):
        with expert_views(block):
            for name, module in block.named_modules():
                if re.search(r"experts\.\d+\.(gate|up|down)_proj$", name):
                    out[f"{i}.{name}"] = module.weight.detach().clone()
    return out


@pytest.mark.parametrize("arch", MOE)
def test_every_expert_projection_is_pruned_at_the_asked_sparsity_and_routers_are_not(arch, calib):
    model = make_tiny_model(arch)
    routers = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.endswith("mlp.gate.weight") or "shared_expert_gate" in n}
    outcome = prune_model(model, calib, PruneConfig(pattern=Unstructured(0.5)), CPU)
    weights = expert_weights(model)
    assert len(weights) == 2 * 4 * 3
    for name, w in weights.items():
        zeros_per_row = (w == 0).sum(dim=1)
        target = round(w.shape[1] * 0.5)
        assert int((zeros_per_row - target).abs().max()) <= 1, name
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in routers.items())
    names = {r.name for r in outcome.layers}
    assert not any(n.endswith("mlp.gate") or "shared_expert_gate" in n for n in names)
    experts = [r for r in outcome.layers if r.expert is not None]
    assert len(experts) == 24 and all(r.expert["tokens"] > 0 for r in experts)
    # Every token goes to top-2 experts: the tokens of a block's gate/up add up to 2 per calibration token.
    gate_ups = [r for r in experts if r.expert["projection"] == "gate_proj" and ".layers.0." in r.name]
    assert sum(r.expert["tokens"] for r in gate_ups) == 2 * calib.numel()
    zeros, total = outcome.block_weights
    assert total == sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2)
    assert 0.49 < zeros / total < 0.5  # the routers (and nothing else) stay dense


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_n_m_holds_in_every_expert(arch, calib):
    model = make_tiny_model(arch)
    prune_model(model, calib, PruneConfig(method="sparsegpt", pattern=NM(2, 4)), CPU)
    for name, w in expert_weights(model).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
        assert int(groups.max()) <= 2, name


def test_sparsegpt_and_admm_reconstruct_experts_better_than_wanda(calib):
    errors = {}
    for method in ("wanda", "sparsegpt", "admm"):
        cfg = PruneConfig(method=method, pattern=Unstructured(0.6), collect=StatsSpec(hessian=True),
                          engine=EngineConfig(expert_min_tokens=1))
        errors[method] = {r.name: r.relative_error for r in prune_model(make_tiny_model("mixtral"), calib, cfg, CPU).layers
                          if r.expert is not None and r.expert["tokens"] >= 64}
    assert len(errors["wanda"]) >= 12
    for method in ("sparsegpt", "admm"):
        worse = [n for n, e in errors[method].items() if not e < errors["wanda"][n]]
        assert not worse, (method, worse)


def test_expert_statistics_are_those_of_the_routed_tokens_weighted_by_the_routing_weight(calib):
    """H of expert e's gate/up input = Σ r² x xᵀ over the tokens the router sends to e (transformers' own
    router, read off the model's own forward), and its token count is theirs."""
    model = make_tiny_model("mixtral")
    module, layout = experts_of(model, 0)
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append([a.detach().clone() for a in args]))
    with torch.no_grad():
        for batch in calib.split(4):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    got = {}

    def observe(group):
        if ".layers.0.mlp.experts." in group.names[0]:
            got[group.names[0]] = (group.stats.count, group.stats.hessian.clone(), group.stats.sumsq.clone())

    calibrate(model, calib, StatsSpec(hessian=True), observe, EngineConfig(batch_size=4), CPU, max_blocks=1)
    for e in range(layout.num_experts):
        h, count, sumsq = torch.zeros(64, 64), 0, torch.zeros(64)
        for x, index, weight in seen:
            pos = (index == e).nonzero()
            rows = x[pos[:, 0]] * weight[pos[:, 0], pos[:, 1]].unsqueeze(-1)
            h += rows.T @ rows
            sumsq += rows.square().sum(0)
            count += rows.shape[0]
        n, hessian, sq = got[f"model.layers.0.mlp.experts.{e}.gate_proj"]
        assert n == count
        torch.testing.assert_close(hessian, h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sq, sumsq, rtol=1e-4, atol=1e-5)


def test_topping_up_blends_the_prior_by_token_count():
    torch.manual_seed(0)
    x, prior_x = torch.randn(5, 8), torch.randn(40, 8)
    routed = InputStats(8, "cpu", StatsSpec(hessian=True))
    routed.add_batch(x)
    prior = InputStats(8, "cpu", StatsSpec(hessian=True))
    prior.add_batch(prior_x)
    out = routed.with_prior(prior, scale=0.25, tokens=20)
    assert out.count == 20 and out.prior_tokens == 15
    expected = x.T @ x + 15 * 0.25 * (prior_x.T @ prior_x) / 40
    torch.testing.assert_close(out.hessian, expected)
    torch.testing.assert_close(out.normalized_hessian(), expected / 20)
    empty = InputStats(8, "cpu", StatsSpec(hessian=True)).with_prior(prior, 1.0, 20)
    torch.testing.assert_close(empty.normalized_hessian(), prior.normalized_hessian())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_experts_that_get_no_token_are_pruned_from_the_blocks_tokens(method):
    """Sixteen experts, top-1, 32 calibration tokens: several experts see no token. They are pruned at the
    asked sparsity from the block's tokens run through them, finite, and listed in the records; with
    --expert-min-tokens, experts with few tokens are topped up too."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=16,
                           num_experts_per_tok=1, max_position_embeddings=256)
    model = MixtralForCausalLM(config).eval()
    calib = torch.randint(0, VOCAB, (2, 16))
    outcome = prune_model(model, calib, PruneConfig(method=method, pattern=Unstructured(0.5),
                                                    engine=EngineConfig(batch_size=1)), CPU)
    experts = [r for r in outcome.layers if r.expert is not None]
    empty = [r for r in experts if r.expert["tokens"] == 0]
    assert len(empty) >= 6
    assert all(r.expert["prior_tokens"] == 32 for r in empty)  # the block's 32 calibration tokens
    assert all(r.sparsity == pytest.approx(0.5, abs=1e-3) for r in experts)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    from prac.io.report import summarize_layers

    summary = summarize_layers(outcome.layers)["experts"]
    assert summary["tokens_min"] == 0 and len(summary["no_tokens"]) * 3 == len(empty)
    assert set(summary["topped_up"]) == {r.name for r in empty}  # the default tops up only those
    few = prune_model(MixtralForCausalLM(config).eval(), calib, PruneConfig(method=method, pattern=Unstructured(0.5),
                      engine=EngineConfig(batch_size=1, expert_min_tokens=8)), CPU).layers
    low = [r for r in few if r.expert is not None and 0 < r.expert["tokens"] < 8]
    assert low and all(r.expert["tokens"] + r.expert["prior_tokens"] == 8 for r in low)


def test_ignore_reaches_expert_names_and_the_shared_expert_is_pruned(calib):
    model = make_tiny_model("qwen2_moe")
    before = expert_weights(model)
    outcome = prune_model(model, calib, PruneConfig(ignore=r"experts\.1\."), CPU)
    after = expert_weights(model)
    for name in before:
        assert torch.equal(before[name], after[name]) == (".experts.1." in name), name
    names = {r.name for r in outcome.layers}
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert "model.layers.0.mlp.experts.1.up_proj" not in names and "model.layers.0.mlp.experts.2.up_proj" in names


def test_sequential_calibrates_expert_down_projections_on_their_pruned_gate_up(calib):
    """A step that zeroes what it is given: sequentially, every expert's down projection then reads
    act(0)·0 = 0, while gate/up of every expert read the (nonzero) routed tokens — one chunk each."""
    seen = {}

    def zero(group, units):
        seen[group.names[0]] = float(group.stats.hessian.abs().max())
        return {n: torch.zeros(units[n].out_features, units[n].in_features) for n in group.names}

    engine = BlockEngine(EngineConfig(batch_size=4, sequential=True, expert_min_tokens=1), CPU)
    engine.run(make_tiny_model("mixtral"), calib, StatsSpec(hessian=True), zero)
    for e in range(4):
        assert seen[f"model.layers.0.mlp.experts.{e}.gate_proj"] > 0
        assert seen[f"model.layers.0.mlp.experts.{e}.down_proj"] == 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_dense_target_holdout_and_correction_run_on_experts_and_rerun_bit_identically(arch, calib):
    cfg = PruneConfig(method="sparsegpt", pattern=Unstructured(0.6), correction=CorrectionConfig.of("optimal"),
                      engine=EngineConfig(batch_size=4, dense_target=True))
    hashes = []
    for _ in range(2):
        model = make_tiny_model(arch)
        outcome = prune_model(model, calib, cfg, CPU)
        hashes.append(state_hash(model))
    experts = [r for r in outcome.layers if r.expert is not None]
    assert len(experts) == 24 and all(r.sparsity == pytest.approx(0.6, abs=0.01) for r in experts)
    assert all("heldout_error_before" in r.correction or r.expert["prior_tokens"] for r in experts)
    assert hashes[0] == hashes[1]


def test_the_dense_target_of_an_expert_is_its_dense_output_on_the_tokens_routed_to_it(calib):
    """Block 0's first chunk sees identical streams: the drift of every expert's gate/up is exactly zero."""
    drifts = {}

    def observe(group, units):
        drifts[group.names[0]] = group.stats.drift if group.stats.drift is not None else group.stats.drift_out
        return None

    engine = BlockEngine(EngineConfig(batch_size=4, dense_target=True, expert_min_tokens=1), CPU)
    engine.run(make_tiny_model("mixtral"), calib, StatsSpec(hessian=True, drift=True), observe, max_blocks=1)
    for e in range(4):
        assert float(drifts[f"model.layers.0.mlp.experts.{e}.gate_proj"].abs().max()) == 0.0


@pytest.mark.parametrize("arch", MOE)
def test_the_saved_folder_reloads_to_the_logits_of_the_pruned_model(arch, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(arch)
    prune_model(model, calib, PruneConfig(method="sparsegpt", pattern=Unstructured(0.5)), CPU)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(input_ids=calib[:2]).logits, reloaded(input_ids=calib[:2]).logits
    assert torch.equal(a, b)
    assert state_hash(model) == state_hash(reloaded)


def test_a_block_weight_prac_does_not_know_is_a_one_line_error_unless_ignored(calib):
    model = make_tiny_model("mistral")
    model.model.layers[1].mlp.register_parameter("fused", torch.nn.Parameter(torch.randn(2, 8, 8)))
    with pytest.raises(PracError, match=r"cannot prune model\.layers\.1\.mlp\.fused \(shape \[2, 8, 8\]\).*--ignore"):
        prune_model(copy.deepcopy(model), calib, PruneConfig(), CPU)
    prune_model(model, calib, PruneConfig(ignore=r"mlp\.fused"), CPU)


def test_experts_whose_forward_prac_cannot_reproduce_are_refused():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4ForCausalLM

    config = Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=4, num_experts_per_tok=1)
    model = Llama4ForCausalLM(config).eval()
    calib = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(PracError, match=r"cannot prune model\.layers\.0\.feed_forward\.experts\.gate_up_proj"):
        prune_model(model, calib, PruneConfig(), CPU)
    outcome = prune_model(model, calib, PruneConfig(ignore="experts"), CPU)
    assert outcome.layers and not any(r.expert for r in outcome.layers)


@pytest.mark.parametrize("allocation", ["owl", "error"])
def test_allocation_plans_every_expert_projection(allocation, calib):
    from prac.jobs.allocation import AllocationConfig, allocate

    model = make_tiny_model("mixtral")
    plan = allocate(model, calib, 0.6, AllocationConfig(method=allocation))
    experts = [n for n in plan.sparsity if ".experts." in n]
    assert len(experts) == 24 and plan.total() == pytest.approx(0.6, abs=1e-4)
    outcome = prune_model(model, calib, PruneConfig(pattern=Unstructured(0.6), plan=plan.sparsity), CPU)
    got = {r.name: r.sparsity for r in outcome.layers}
    assert all(abs(got[n] - plan.sparsity[n]) < 0.02 for n in experts)


def test_prac_prune_and_verify_on_an_moe_folder(tmp_path, tokenizer, capsys):
    from prac.cli import main

    folder = tmp_path / "qwen2moe"
    make_tiny_model("qwen2_moe").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    save_file({"input_ids": torch.randint(0, VOCAB, (8, 32))}, str(tmp_path / "ids.safetensors"))
    code = main(["prune", "--model", str(folder), "--calib-tokens", str(tmp_path / "ids.safetensors"), "--eval", "none",
                 "--no-progress", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "pruned 38 layers" in out and "experts: 24 projections" in out, out
    assert "all weight matrices of the blocks: 0.4" in out
    code = main(["verify", "--model", str(folder), "--calib-tokens", str(tmp_path / "ids.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and " 0 failed" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_two_processes_prune_an_moe_model_like_one(method, tmp_path, tokenizer):
    """Per-expert statistics (and the top-up priors, forced here for every expert) reduced across ranks
    in the fixed order: the saved weights are sha256-equal to one process's."""
    import hashlib

    from tests.test_distributed import _prac

    folder = tmp_path / "qwen2moe"
    make_tiny_model("qwen2_moe").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    save_file({"input_ids": torch.randint(0, VOCAB, (8, 32))}, str(tmp_path / "ids.safetensors"))
    hashes = {}
    for world in (1, 2):
        cwd = tmp_path / f"w{world}"
        cwd.mkdir()
        proc = _prac(["prune", "--model", str(folder), "--calib-tokens", str(tmp_path / "ids.safetensors"),
                      "--method", method, "--sparsity", "0.6", "--batch-size", "2", "--expert-min-tokens", "100000",
                      "--eval", "none", "--no-progress", "--save", "out"], world, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hashes[world] = hashlib.sha256((cwd / "out" / "model.safetensors").read_bytes()).hexdigest()
    assert hashes[1] == hashes[2]
