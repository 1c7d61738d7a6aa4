"""--wbits: survivors on compressed-tensors' grid (joint with SparseGPT's sweep, or GPTQ on a fixed
mask), pruned weights kept zero, the compressed folder reloading to the in-memory logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prac.cli import main
from prac.core.errors import PracError
from prac.correction.objective import relative_error
from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig, prune_model
from prac.engine.reconstruct import ReconstructConfig
from prac.methods.patterns import NM, Unstructured
from prac.methods.sparsegpt import sparsegpt_prune
from prac.model.units import model_units
from prac.quant.gptq import ColumnQuantizer, QuantConfig, on_grid

from .conftest import VOCAB, make_tiny_model, tree_state

CPU = torch.device("cpu")
Q4 = QuantConfig(bits=4, group_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (8, 32))


def weights(model) -> dict[str, torch.Tensor]:
    return {name: unit.read() for _b, _i, units in model_units(model) for name, unit in units.items()}


def run(calib, method="sparsegpt", pattern=None, quant=Q4, **engine):
    if pattern is None:
        pattern = Unstructured(0.5)
    model = make_tiny_model("mistral")
    outcome = prune_model(model, calib, PruneConfig(method=method, pattern=pattern, quant=quant,
                                                    engine=EngineConfig(batch_size=2, **engine)), CPU)
    return model, outcome


@pytest.mark.parametrize("method,pattern,quant,sweep", [
    ("sparsegpt", Unstructured(0.5), Q4, "joint"),
    ("sparsegpt", NM(2, 4), QuantConfig(bits=3, group_size=-1, symmetric=False), "joint"),
    ("wanda", Unstructured(0.5), Q4, "gptq on the mask"),
    ("admm", Unstructured(0.7), QuantConfig(bits=2, group_size=64), "gptq on the mask"),
    ("wanda", Unstructured(0.0), Q4, "gptq on the mask"),  # plain GPTQ
])
def test_every_survivor_lies_on_its_group_grid_and_pruned_weights_stay_zero(method, pattern, quant, sweep, calib):
    model, outcome = run(calib, method, pattern, quant)
    plain_model, plain = run(calib, method, pattern, QuantConfig())
    quantized, unquantized = weights(model), weights(plain_model)
    assert set(outcome.grids) == set(quantized) and len(quantized) == 14
    for name, w in quantized.items():
        grid = outcome.grids[name]
        assert on_grid(w, grid), name
        assert grid.scales.shape == (w.shape[0], w.shape[1] // quant.group(w.shape[1]))
        if sweep == "gptq on the mask" and ".layers.0." in name:  # block 0 has the same inputs, so the same
            assert torch.all(w[unquantized[name] == 0] == 0), name  # mask: every zero of it stays zero
    records = {r.name: r for r in outcome.layers}
    assert all(r.quant["sweep"] == sweep and r.quant["bits"] == quant.bits for r in records.values())
    share = sum(float((w == 0).sum()) for w in quantized.values()) / sum(w.numel() for w in quantized.values())
    assert share >= pattern.target_sparsity - 1e-6  # rounding may add zeros, never remove them
    if sweep == "gptq on the mask":
        assert all(r.quant["error_unquantized"] <= r.relative_error for r in records.values())


def test_eight_bits_are_within_rounding_of_the_unquantized_run(calib):
    for method in ("sparsegpt", "wanda"):
        _, q8 = run(calib, method, quant=QuantConfig(bits=8, group_size=32))
        e8 = [r.relative_error for r in q8.layers]
        if method == "sparsegpt":  # the joint sweep against SparseGPT alone
            _, plain = run(calib, method, quant=QuantConfig())
            e = [r.relative_error for r in plain.layers]
        else:  # GPTQ on the mask: the same records hold the error before rounding
            e = [r.quant["error_unquantized"] for r in q8.layers]
        # 8-bit rounding is far below the pruning error: the summed layer error moves by under 1.5%
        # (o_proj, whose input a tiny random model makes nearly low-rank, moves most)
        assert abs(sum(e8) - sum(e)) <= 0.015 * sum(e), (method, e8, e)
        _, q4 = run(calib, method, quant=Q4)
        assert sum(r.relative_error for r in q4.layers) > sum(e8) + 0.01 * sum(e)  # and 4 bits cost more


def test_joint_sweep_beats_pruning_then_rounding_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(2048, 64) @ torch.randn(64, 64) * 0.3 + torch.randn(2048, 64)  # correlated inputs
    h = x.t() @ x
    w = torch.randn(48, 64)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        joint = ColumnQuantizer(Q4, 64, 48, torch.float32, CPU)
        both = sparsegpt_prune(w, h, pattern, quant=joint).weight
        assert on_grid(both, joint)
        pruned = sparsegpt_prune(w, h, pattern).weight
        rtn = ColumnQuantizer(Q4, 64, 48, torch.float32, CPU)
        for g in range(0, 64, 32):
            rtn.set_group(g, pruned.t()[g:g + 32])
        rounded = torch.stack([rtn(c, pruned[:, c]) for c in range(64)], dim=1)
        # the round-to-nearest baseline, checked without the quantizer's own call: every weight is an
        # integer in [-8, 7] times its group's scale, the nearest such value to the pruned weight, and
        # the pruned positions are exactly zero
        scale = rtn.scales.repeat_interleave(32, dim=1)
        ints = (rounded / scale).round()
        assert torch.equal(ints * scale, rounded) and ints.min() >= -8 and ints.max() <= 7, pattern
        assert torch.all((rounded - pruned).abs() <= scale / 2 * (1 + 1e-5)), pattern
        assert torch.all(rounded[pruned == 0] == 0) and torch.all(pruned[rounded != 0] != 0), pattern
        assert relative_error(both, w, h) < relative_error(rounded, w, h), pattern


def test_quantization_after_reconstruction_keeps_masks_and_grid(calib):
    model, outcome = run(calib, "wanda", quant=Q4,
                         reconstruct=ReconstructConfig("block", epochs=1, minibatches=2, lr=1e-3, holdout=0.0))
    plain_model, _ = run(calib, "wanda", quant=QuantConfig(), )
    for name, w in weights(model).items():
        assert on_grid(w, outcome.grids[name]), name
        assert outcome.layers[0].quant["sweep"].endswith("after reconstruction")
    assert all("error_of_the_rounding" in r.quant for r in outcome.layers)
    first = {n: w for n, w in weights(plain_model).items() if ".layers.0." in n}
    tuned = weights(model)
    assert all(torch.all(tuned[n][w == 0] == 0) for n, w in first.items())  # block 0: same inputs, same mask


def test_quantized_prune_is_bit_identical_when_repeated(calib):
    a, _ = run(calib, "sparsegpt", quant=Q4)
    b, _ = run(calib, "sparsegpt", quant=Q4)
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))


def test_group_size_that_does_not_divide_is_refused_before_work(calib):
    with pytest.raises(PracError, match="--groupsize 48 does not divide the 64 inputs"):
        run(calib, quant=QuantConfig(bits=4, group_size=48))
    with pytest.raises(PracError, match="--wbits must be one of"):
        QuantConfig(bits=5)


def test_compressed_folder_reloads_to_the_in_memory_logits(calib, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from prac.io.outputs import REPORT_NAME
    from prac.io.saving import stage_model

    model, outcome = run(calib, "sparsegpt", NM(2, 4), Q4)
    ids = calib[:2, :16]
    with torch.no_grad():
        expected = model(ids).logits
    in_memory = weights(model)  # before the packed save, which compresses the model in place
    dense_report: dict = {}
    stage_model(model, tokenizer, tmp_path / "dense", dense_report).commit()
    report: dict = {}
    stage_model(model, tokenizer, tmp_path / "packed", report, (outcome.grids, Q4)).commit()
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["sparsity_config"] == {}
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert config["ignore"] == ["lm_head"]
    assert report["saved"]["weight_bytes"] < dense_report["saved"]["weight_bytes"]
    saved = json.loads((tmp_path / "packed" / REPORT_NAME).read_text())
    assert saved["saved"]["format"] == "compressed-tensors pack-quantized"
    for folder in ("packed", "dense"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        params = {name for name, _ in reloaded.named_parameters()}  # as loaded (a forward decompresses)
        with torch.no_grad():
            got = reloaded(ids).logits
        assert torch.equal(got, expected), folder
        packed = {name for name in params if name.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale")}
        if folder == "dense":
            assert not packed and all(f"{n}.weight" in params for n in outcome.grids)
        else:  # every quantized linear came back as packed integers and scales, no float weight
            assert packed == {f"{n}.{k}" for n in outcome.grids for k in ("weight_packed", "weight_scale")}
            assert not any(f"{n}.weight" in params for n in outcome.grids)
    # the file itself, read without the library: 4-bit integers, 8 to an int32 (lowest bits first, stored
    # with +8), times the group's scale, are the in-memory weights exactly, zeros included
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        assert not any(f"{n}.weight" in f.keys() for n in outcome.grids)
        for name, w in in_memory.items():
            words = f.get_tensor(f"{name}.weight_packed")
            assert words.dtype == torch.int32 and words.shape == (w.shape[0], w.shape[1] // 8), name
            ints = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(w.shape) - 8
            scale = f.get_tensor(f"{name}.weight_scale")
            assert torch.equal(scale, outcome.grids[name].scales.to(scale.dtype)), name
            assert torch.equal(ints * scale.repeat_interleave(32, dim=1), w), name


# --- the command line -------------------------------------------------------------------------------------

SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval", "none", "--no-progress"]


@pytest.fixture
def work(tmp_path, tiny_model_dir, small_text):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("mistral"), model)
    return tmp_path, model, small_text


def _one_line_error(argv, capsys, root: Path, *needles: str) -> None:
    before = tree_state(root)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors (an invalid choice)
        code = exit.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("see 'prac")]
    assert code == 2 and len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    assert tree_state(root) == before


@pytest.mark.parametrize("extra,needles", [
    (["--wbits", "5"], ["--wbits", "invalid choice"]),
    (["--wbits", "4"], ["--groupsize 128 does not divide the 64 inputs"]),
    (["--wbits", "4", "--groupsize", "0"], ["--groupsize must be -1"]),
    (["--groupsize", "32"], ["--groupsize given without --wbits"]),
    (["--wbits", "4", "--groupsize", "32", "--method", "sparsegpt", "--blocksize", "48"],
     ["--groupsize 32 and the sweep's --blocksize 48 must divide one another"]),
    (["--wbits", "4", "--groupsize", "32", "--asym", "--save-format", "compressed", "--save", "OUT"], ["symmetric"]),
    (["--save-format", "compressed", "--save", "OUT"], ["give --wbits"]),
    (["--wbits", "4", "--groupsize", "32", "--save-format", "compressed"], ["without --save"]),
])
def test_bad_quantization_options_are_one_line(extra, needles, work, capsys):
    root, model, text = work
    extra = [str(root / "out") if a == "OUT" else a for a in extra]
    _one_line_error(["prune", "--model", str(model), "--calib", str(text), *SMALL, *extra], capsys, root, *needles)


def test_compressed_save_refuses_fused_experts_before_work(tmp_path, tiny_model_dir, small_text, capsys):
    _one_line_error(["prune", "--model", str(tiny_model_dir("mixtral")), "--calib", str(small_text), *SMALL,
                     "--wbits", "4", "--groupsize", "32", "--save-format", "compressed", "--save", str(tmp_path / "out")],
                    capsys, tmp_path, "fused MoE experts", "--save-format dense")


def test_auto_save_format_on_an_moe_model_saves_dense_and_says_so(tmp_path, small_text, capsys):
    """--wbits 4 --save on the bundled tiny Mixtral: auto would pick compressed-tensors, which cannot hold
    fused experts; it saves dense instead (every layer still quantized), with one line saying so."""
    from prac.io import assets

    out = tmp_path / "out"
    assert main(["prune", "--model", str(assets.MOE_MODEL), "--calib", str(small_text), *SMALL,
                 "--wbits", "4", "--groupsize", "32", "--save", str(out)]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "--save-format auto" in line]
    assert len(said) == 1 and "dense" in said[0] and "fused MoE experts" in said[0], captured.err
    assert "error" not in captured.err
    report = json.loads((out / "prac_report.json").read_text())
    assert report["config"]["save_format"] == "dense" and report["saved"]["format"] == "dense"
    assert report["summary"]["quantization"]["quantized_layers"] == len(report["layers"])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_cli_quantized_prune_saves_compressed_by_default(work, capsys):
    root, model, text = work
    out = root / "out"
    assert main(["prune", "--model", str(model), "--calib", str(text), *SMALL, "--method", "sparsegpt",
                 "--wbits", "4", "--groupsize", "32", "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 layers to 4-bit, groups of 32, symmetric (joint: 14)" in printed
    assert "compressed-tensors pack-quantized" in printed
    report = json.loads((out / "prac_report.json").read_text())
    assert report["summary"]["quantization"]["quantized_layers"] == 14
    assert all(layer["quant"]["bits"] == 4 for layer in report["layers"])
    assert report["config"]["save_format"] == "compressed"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_moe_experts_are_quantized_on_their_masks(calib):
    """Fused experts: every expert projection on its grid after GPTQ on its mask (saved dense)."""
    model = make_tiny_model("mixtral")
    outcome = prune_model(model, calib, PruneConfig(method="wanda", pattern=Unstructured(0.5), quant=Q4,
                                                    engine=EngineConfig(batch_size=2)), CPU)
    experts = [r for r in outcome.layers if r.expert is not None]
    assert len(experts) == 2 * 4 * 3 and all(r.quant["sweep"] == "gptq on the mask" for r in experts)
    for name, w in weights(model).items():
        assert on_grid(w, outcome.grids[name]), name
        assert float((w == 0).float().mean()) >= 0.5 - 1e-6, name
