"""The sequential pipeline on tiny random models of six architectures."""

import pytest
import torch

from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig, prune_model
from prac.io.data import load_calibration
from prac.methods.patterns import NM, Unstructured
from prac.model.blocks import capture_block_inputs, find_blocks, find_linears, get_weight, group_by_input
from prac.model.loading import load_model
from prac.model.stats import StatsSpec
from tests.conftest import make_tiny_model, state_hash

CPU = torch.device("cpu")
ARCHS = ["mistral", "qwen2", "opt", "gpt_neox", "gpt2", "bert"]


@pytest.fixture(scope="module")
def calib(small_text, tokenizer):
    return load_calibration(str(small_text), tokenizer, nsamples=6, seqlen=32, seed=0).input_ids


def _non_block_state(model, blocks_path):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(blocks_path + ".")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=["50", "2of4"])
def test_every_block_linear_is_pruned_and_nothing_else(arch, pattern, calib):
    model = make_tiny_model(arch)
    blocks = find_blocks(model)
    before = _non_block_state(model, blocks.path)
    biases = {n: m.bias.clone() for n, m in model.named_modules() if getattr(m, "bias", None) is not None}
    outcome = prune_model(model, calib, PruneConfig(method="wanda", pattern=pattern, engine=EngineConfig(batch_size=4)), CPU)
    names = [n for i, b in enumerate(blocks.modules) for n in find_linears(b, blocks.name(i))]
    assert sorted(r.name for r in outcome.layers) == sorted(names) and names
    modules = dict(model.named_modules())
    for name in names:
        w = get_weight(modules[name])  # [out, in] also for GPT-2's transposed Conv1D
        if isinstance(pattern, NM):
            assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)
        else:
            assert torch.all((w == 0).sum(1) >= w.shape[1] // 2)
    after = _non_block_state(model, blocks.path)
    assert all(torch.equal(before[k], after[k]) for k in before), "embeddings/head/norms must not change"
    for n, m in model.named_modules():
        if n in biases:
            assert torch.equal(biases[n], m.bias), f"bias of {n} changed"
    with torch.no_grad():
        out = model(input_ids=calib[:2])
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()


def test_block_discovery_names():
    expect = {"mistral": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers",
              "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h", "bert": "encoder.layer"}
    for arch, path in expect.items():
        assert find_blocks(make_tiny_model(arch)).path == path


def test_shared_inputs_share_one_accumulator(calib):
    model = make_tiny_model("mistral")
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calib.split(3), CPU, CPU)
    linears = find_linears(blocks.modules[0], blocks.name(0))
    groups = group_by_input(blocks.modules[0], linears, inputs, CPU)
    short = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("arch", ["mistral", "gpt2", "bert"])
def test_sparsity_zero_reproduces_dense_hidden_states(arch, calib):
    model = make_tiny_model(arch)
    blocks = find_blocks(model)
    reference = []
    handle = blocks.modules[-1].register_forward_hook(lambda m, a, o: reference.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for ids in calib.split(3):
            model(input_ids=ids)
    handle.remove()
    before = state_hash(model)
    outcome = prune_model(model, calib, PruneConfig(pattern=Unstructured(0.0), engine=EngineConfig(batch_size=3)), CPU,
                          return_hidden=True)
    assert state_hash(model) == before
    for ref, got in zip(reference, outcome.final_hidden):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pruned_blocks_feed_the_next_block(calib):
    """Block 1 is calibrated on the outputs of pruned block 0 (not the dense ones)."""
    seq = make_tiny_model("mistral")
    prune_model(seq, calib, PruneConfig(pattern=Unstructured(0.6), engine=EngineConfig(batch_size=3)), CPU)
    # Reference: prune block 0 alone, then compute block-1 inputs from that model.
    ref = make_tiny_model("mistral")
    cfg = PruneConfig(pattern=Unstructured(0.6), engine=EngineConfig(batch_size=3), ignore=r"layers\.1\.")
    prune_model(ref, calib, cfg, CPU)
    cfg1 = PruneConfig(pattern=Unstructured(0.6), engine=EngineConfig(batch_size=3), ignore=r"layers\.0\.")
    prune_model(ref, calib, cfg1, CPU)
    assert state_hash(seq) == state_hash(ref)


def test_results_do_not_depend_on_collection_mode_or_layer_batching(calib):
    base = make_tiny_model("mistral")
    prune_model(base, calib, PruneConfig(engine=EngineConfig(batch_size=3)), CPU)
    variants = [
        PruneConfig(engine=EngineConfig(batch_size=3), collect=StatsSpec(hessian=True)),
        PruneConfig(engine=EngineConfig(batch_size=3), collect=StatsSpec(max_samples=50, seed=1)),
        PruneConfig(engine=EngineConfig(batch_size=3, layer_batch_size=1)),
    ]
    for cfg in variants:
        model = make_tiny_model("mistral")
        prune_model(model, calib, cfg, CPU)
        assert state_hash(model) == state_hash(base), cfg


def test_two_runs_are_bit_identical(tiny_model_dir, calib):
    hashes = []
    for _ in range(2):
        model = load_model(str(tiny_model_dir("qwen2")))
        prune_model(model, calib, PruneConfig(pattern=NM(2, 4), engine=EngineConfig(batch_size=4)), CPU)
        hashes.append(state_hash(model))
    assert hashes[0] == hashes[1]


def test_magnitude_needs_no_calibration_and_layer_scope(calib):
    model = make_tiny_model("opt")
    prune_model(model, calib, PruneConfig(method="magnitude", pattern=Unstructured(0.5)), CPU)
    layer = make_tiny_model("opt")
    from prac.methods.registry import ScoreSettings

    prune_model(layer, calib, PruneConfig(method="magnitude", settings=ScoreSettings(scope="layer")), CPU)
    w = get_weight(layer.model.decoder.layers[0].fc1)
    assert abs(float((w == 0).float().mean()) - 0.5) < 1e-3
    assert state_hash(model) != state_hash(layer)
