"""--bos auto|always|never: BOS at the start of every calibration and evaluation window for the model
families trained that way (Gemma 2/3), the papers' windows (only the text's start has BOS) otherwise,
settled before the weights load and recorded in the report's protocol."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prac.jobs.evaluator
import prac.jobs.prune
import prac.model.loading
from prac.cli import main
from prac.core.errors import PracError
from prac.io.data import BOS_MODEL_TYPES, bos_mode, eval_windows, load_calibration, load_eval_tokens, model_type_of

from .conftest import VOCAB

BOS = 1  # the bundled tokenizer's <s>
SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--no-progress", "--method", "magnitude"]


def _gemma_configs():
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=64,
                bos_token_id=BOS, eos_token_id=2, pad_token_id=3)
    return {"gemma3_text": Gemma3TextConfig(**text), "gemma2": Gemma2Config(**text),
            "gemma3": Gemma3Config(text_config=text)}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Gemma 3 (text) with the bundled tokenizer: what ``--bos auto`` turns on for."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    AutoModelForCausalLM.from_config(_gemma_configs()["gemma3_text"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, small_text) -> Path:
    """A few thousand characters to evaluate on (a few dozen windows of 32 tokens)."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(small_text.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


@pytest.fixture
def windows_seen(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """The calibration tokens the prune gets and the windows every perplexity is computed on."""
    seen: dict[str, list[torch.Tensor]] = {"calibration": [], "evaluation": []}
    prune_model, perplexity = prac.jobs.prune.prune_model, prac.jobs.evaluator.perplexity

    def calibrate(model, ids, *args, **kwargs):
        seen["calibration"].append(ids.clone())
        return prune_model(model, ids, *args, **kwargs)

    def score(model, windows, *args, **kwargs):
        seen["evaluation"].append(windows.clone())
        return perplexity(model, windows, *args, **kwargs)

    monkeypatch.setattr(prac.jobs.prune, "prune_model", calibrate)
    monkeypatch.setattr(prac.jobs.evaluator, "perplexity", score)
    return seen


# --- the windows -------------------------------------------------------------------------------------

def test_always_replaces_the_first_token_of_every_window_and_never_keeps_the_text(tokenizer, small_text):
    never = load_calibration(str(small_text), tokenizer, nsamples=8, seqlen=32, seed=0)
    always = load_calibration(str(small_text), tokenizer, nsamples=8, seqlen=32, seed=0, bos=BOS)
    assert always.input_ids.shape == never.input_ids.shape == (8, 32)
    assert torch.all(always.input_ids[:, 0] == BOS)
    assert torch.equal(always.input_ids[:, 1:], never.input_ids[:, 1:])  # the same windows, the same starts
    assert not torch.any(never.input_ids == BOS)  # this tokenizer adds no BOS and the text holds none
    assert never.protocol["bos"] == "never"
    assert always.protocol["bos"] == "always" and always.protocol["bos_token_id"] == BOS

    tokens, _ = load_eval_tokens(str(small_text), tokenizer)
    plain, with_bos = eval_windows(tokens, 32), eval_windows(tokens, 32, BOS)
    assert plain.shape == with_bos.shape and torch.all(with_bos[:, 0] == BOS)
    assert torch.equal(with_bos[:, 1:], plain[:, 1:]) and not torch.any(plain[:, 0] == BOS)
    assert int(tokens[0]) != BOS and torch.equal(eval_windows(tokens, 32), plain)  # the input is not changed


@pytest.mark.parametrize("arch,expected", [("gemma3_text", "always"), ("gemma2", "always"), ("gemma3", "always"),
                                           ("mistral", "never"), ("qwen2", "never"), ("mixtral", "never")])
def test_auto_is_always_for_the_families_that_need_bos_and_never_otherwise(arch, expected):
    from .conftest import _configs

    config = _gemma_configs()[arch] if arch.startswith("gemma") else _configs()[arch]
    assert bos_mode("auto", config) == expected
    assert (model_type_of(config) in BOS_MODEL_TYPES) == (expected == "always")
    assert bos_mode("always", config) == "always" and bos_mode("never", config) == "never"


def test_auto_without_a_config_is_never_and_a_bad_choice_is_refused():
    assert bos_mode("auto") == "never"
    with pytest.raises(PracError, match="--bos must be one of"):
        bos_mode("sometimes")


# --- prune and eval ----------------------------------------------------------------------------------

def test_a_gemma3_prune_calibrates_and_evaluates_with_bos_and_the_report_records_it(gemma3_dir, small_text,
                                                                                     short_text, tmp_path,
                                                                                     windows_seen):
    report = tmp_path / "r.json"
    assert main(["prune", "--model", str(gemma3_dir), "--calib", str(small_text), "--eval", str(short_text),
                 *SMALL, "--report", str(report)]) == 0
    (calib,), evaluated = windows_seen["calibration"], windows_seen["evaluation"]
    assert calib.shape == (4, 32) and torch.all(calib[:, 0] == BOS)
    assert len(evaluated) == 2 and all(w.shape[1] == 32 and torch.all(w[:, 0] == BOS) for w in evaluated)
    config = json.loads(report.read_text())["config"]
    assert config["bos"] == "auto" and config["bos_resolved"] == "always"
    assert config["calibration"]["bos"] == "always" and config["calibration"]["bos_token_id"] == BOS
    assert config["evaluation"]["bos"] == "always" and "replaced by BOS (id 1)" in config["evaluation"]["rule"]


def test_never_on_gemma3_and_auto_on_mistral_keep_the_papers_windows(gemma3_dir, tiny_model_dir, small_text,
                                                                     short_text, tmp_path, windows_seen):
    runs = {"gemma3 never": [str(gemma3_dir), "--bos", "never"], "mistral auto": [str(tiny_model_dir("mistral"))],
            "mistral never": [str(tiny_model_dir("mistral")), "--bos", "never"]}
    seen = {}
    for name, (model, *bos) in runs.items():
        report = tmp_path / f"{name.replace(' ', '-')}.json"
        assert main(["prune", "--model", model, "--calib", str(small_text), "--eval", str(short_text), *SMALL,
                     "--report", str(report), *bos]) == 0
        seen[name] = (windows_seen["calibration"].pop(), windows_seen["evaluation"][-1])
        config = json.loads(report.read_text())["config"]
        assert config["bos_resolved"] == "never" and config["calibration"]["bos"] == "never", name
        assert config["evaluation"]["bos"] == "never" and "no BOS added" in config["evaluation"]["rule"], name
    for calib, evaluated in seen.values():
        assert not torch.any(calib[:, 0] == BOS) and not torch.any(evaluated[:, 0] == BOS)
    # auto on a model that needs no BOS is exactly today's protocol: the golden numbers stay
    assert all(torch.equal(a, b) for a, b in zip(seen["mistral auto"], seen["mistral never"]))


def test_calibration_token_files_are_used_as_given(gemma3_dir, tmp_path, windows_seen, capsys):
    torch.manual_seed(0)
    ids = torch.randint(4, VOCAB, (4, 32))
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    report = tmp_path / "r.json"
    assert main(["prune", "--model", str(gemma3_dir), "--calib-tokens", str(tmp_path / "calib.safetensors"),
                 "--eval", "none", "--no-progress", "--method", "magnitude", "--bos", "always",
                 "--report", str(report)]) == 0
    assert torch.equal(windows_seen["calibration"][0], ids)
    assert json.loads(report.read_text())["config"]["calibration"]["bos"].startswith("as given")


def test_eval_follows_the_model_and_a_saved_folder_keeps_its_choice(gemma3_dir, small_text, short_text, tmp_path,
                                                                    windows_seen):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(gemma3_dir), "--data", str(short_text), "--seqlen", "32", "--no-progress",
                 "--report", str(report)]) == 0
    assert torch.all(windows_seen["evaluation"].pop()[:, 0] == BOS)
    written = json.loads(report.read_text())["config"]
    assert written["bos"] == "auto" and written["bos_resolved"] == "always" and written["evaluation"]["bos"] == "always"
    # a folder pruned with --bos never is evaluated with the protocol its report records
    out = tmp_path / "out"
    assert main(["prune", "--model", str(gemma3_dir), "--calib", str(small_text), "--eval", str(short_text), *SMALL,
                 "--bos", "never", "--save", str(out)]) == 0
    windows_seen["evaluation"].clear()
    assert main(["eval", "--model", str(out), "--no-progress", "--report", str(report), "--overwrite"]) == 0
    assert not torch.any(windows_seen["evaluation"][0][:, 0] == BOS)
    assert json.loads(report.read_text())["config"]["bos_resolved"] == "never"


# --- a tokenizer without BOS ---------------------------------------------------------------------------

@pytest.fixture
def no_bos_model(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny Mistral whose tokenizer has no BOS token."""
    from transformers import AutoTokenizer

    model = tmp_path / "no-bos"
    shutil.copytree(tiny_model_dir("mistral"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(model).bos_token_id is None
    return model


@pytest.mark.parametrize("command", ["prune", "eval", "verify", "spectrum"])
def test_always_with_a_tokenizer_without_bos_is_one_line_before_the_weights_load(command, no_bos_model, small_text,
                                                                                 tmp_path, no_load, capsys):
    data = {"prune": ["--calib", str(small_text), "--eval", "none"], "eval": ["--data", str(small_text)],
            "verify": ["--calib", str(small_text)], "spectrum": ["--data", str(small_text), "--out", str(tmp_path / "s/")]}
    code = main([command, "--model", str(no_bos_model), *data[command], "--seqlen", "32", "--no-progress",
                 "--bos", "always"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--bos always" in err[0] and "no BOS token" in err[0] and "Traceback" not in err[0], err[0]
    assert not (tmp_path / "s").exists()


def test_never_and_auto_need_no_bos_token(no_bos_model, short_text, capsys):
    for bos in ("never", "auto"):
        assert main(["eval", "--model", str(no_bos_model), "--data", str(short_text), "--seqlen", "32",
                     "--no-progress", "--bos", bos]) == 0, capsys.readouterr().err


def test_spectrum_records_its_windows_bos(small_text, tmp_path):
    from prac.cli import build_parser
    from prac.cli.spectrum import _load

    args = build_parser().parse_args(["spectrum", "--data", str(small_text), "--n-samples", "2", "--seqlen", "16",
                                      "--bos", "always", "--device", "cpu"])
    _, windows, desc = _load(args)
    assert torch.all(windows[:, 0] == BOS) and desc["bos"] == "always" and desc["bos_requested"] == "always"
    args.bos = "auto"  # the bundled Mistral: never
    _, windows, desc = _load(args)
    assert not torch.any(windows[:, 0] == BOS) and desc["bos"] == "never"
