"""What a new user meets first (issue 24): inputs refused before the model loads, saved folders that
keep the source's files, an evaluation for encoders, and one consistent CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import prac.jobs.prune
import prac.model.loading
from prac.cli import main
from prac.core.errors import PracError


def _error(argv: list[str], capsys, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert not any("Traceback" in line or "Retrying" in line for line in err), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


# --- 1. inputs checked before the weights are loaded ------------------------------------------------

def test_missing_calib_file_is_refused_before_any_weight_is_loaded(tiny_model_dir, tmp_path, no_load, capsys):
    _error(["prune", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--calib",
            str(tmp_path / "nothere.txt")], capsys, "--calib", "nothere.txt", "does not exist")


@pytest.mark.parametrize("case", ["eval", "calib-tokens", "calib-folder", "calib-binary", "jsonl", "nm"])
def test_bad_inputs_are_refused_before_the_load(case, tiny_model_dir, small_text, tmp_path, no_load, capsys):
    (tmp_path / "bin.txt").write_bytes(b"abc\0def")
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    base = ["prune", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text),
            "--nsamples", "2", "--seqlen", "32"]
    argv, needles = {
        "eval": (["--eval", str(tmp_path / "missing.txt")], ("--eval", "does not exist")),
        "calib-tokens": (["--calib-tokens", str(tmp_path / "missing")], ("calibration token file", "does not exist")),
        "calib-folder": (["--calib", str(tmp_path)], ("--calib", "is a folder")),
        "calib-binary": (["--calib", str(tmp_path / "bin.txt")], ("binary",)),
        "jsonl": (["--eval", str(tmp_path / "bad.jsonl")], ("bad.jsonl:1", "'text' field")),
        "nm": (["--nm", "3:7", "--eval", "none"], ("3:7", "M=7 does not divide in_features=64")),
    }[case]
    _error([*base, *argv], capsys, *needles)


def test_eval_and_verify_check_their_texts_before_the_load(tiny_model_dir, tmp_path, no_load, capsys):
    model = str(tiny_model_dir("mistral"))
    _error(["eval", "--no-progress", "--model", model, "--data", str(tmp_path / "gone.txt")], capsys,
           "--data", "does not exist")
    _error(["verify", "--no-progress", "--model", model, "--calib", str(tmp_path / "gone.txt")], capsys,
           "--calib", "does not exist")


def test_a_folder_without_a_tokenizer_is_one_whole_line_before_the_load(tiny_model_dir, tmp_path, no_load, capsys):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    shutil.copy(tiny_model_dir("mistral") / "config.json", model)
    line = _error(["prune", "--no-progress", "--model", str(model), "--eval", "none"], capsys, "has no tokenizer",
                  "copy the tokenizer files")
    assert not line.rstrip().endswith(":")


def test_hub_texts_offline_are_one_line_before_the_load(tiny_model_dir, tmp_path, monkeypatch, no_load, capsys):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    _error(["prune", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--eval", "c4"], capsys,
           "--eval c4", "allenai/c4", "HF_HUB_OFFLINE=1", "no copy")


def test_the_dataset_loader_does_not_retry_an_unreachable_hub(tmp_path, monkeypatch):
    """With the hub unreachable (not only HF_HUB_OFFLINE) ``datasets`` is put in offline mode for the
    call: one line at once, no 40 s of HEAD retries: not one host name is looked up, not one connection
    tried (counted instead of timed: a busy machine is slow, not wrong)."""
    import socket

    import datasets.config

    from prac.io.data import load_eval_tokens

    tried: list = []
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def looked_up(host, port, *args, **kwargs):
        tried.append((host, port))
        return getaddrinfo(host, port, *args, **kwargs)

    def connected(self, address):
        tried.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", looked_up)
    monkeypatch.setattr(socket.socket, "connect", connected)
    monkeypatch.setattr(prac.model.loading, "hub_offline_reason", lambda: "https://huggingface.co is unreachable (test)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(PracError, match="cannot be reached .*unreachable \\(test\\)"):
        load_eval_tokens("wikitext2", None)
    assert tried == []  # datasets read its (empty) cache and asked no one
    assert datasets.config.HF_HUB_OFFLINE == before  # offline for the call only


def test_evaluating_on_the_calibration_text_warns(tiny_model_dir, small_text, tmp_path, capsys):
    args = ["prune", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text),
            "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--method", "magnitude", "--no-dense-eval"]
    copy = tmp_path / "copy.txt"
    shutil.copy(small_text, copy)
    assert main([*args, "--eval", str(copy)]) == 0
    assert "is the calibration text" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[:20000] + " different")
    assert main([*args, "--eval", str(other)]) == 0
    assert "is the calibration text" not in capsys.readouterr().err


# --- 2. a saved folder keeps the source's other files -----------------------------------------------

@pytest.fixture
def minilm_like(tiny_model_dir, tmp_path) -> Path:
    """A sentence-transformers folder: a BertModel saved with save_pretrained, its modules.json,
    pooling config, a model card, and a dense ONNX export that must not be carried over."""
    folder = tmp_path / "all-MiniLM-like"
    shutil.copytree(tiny_model_dir("bert"), folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"pytorch": "2"}}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# all-MiniLM-like\n\nA sentence encoder.\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"dense weights")
    (folder / "pytorch_model.bin").write_bytes(b"dense weights")
    return folder


def test_saved_minilm_like_folder_keeps_modules_and_pooling(minilm_like, small_text, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--no-progress", "--model", str(minilm_like), "--calib", str(small_text), "--nsamples", "2",
            "--seqlen", "32", "--eval", "none", "--method", "magnitude", "--nm", "2:4", "--save", str(out)]
    assert main(args) == 0
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert (out / "config_sentence_transformers.json").is_file()
    assert not (out / "onnx").exists() and not (out / "pytorch_model.bin").exists()  # the source's dense weights
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n---") and "A sentence encoder." in card
    assert "## Pruned with prac" in card and "magnitude, 2:4" in card and str(minilm_like) in card
    saved = json.loads((out / "prac_report.json").read_text())["saved_files"]
    assert {"modules.json", "1_Pooling/config.json", "README.md"} <= set(saved)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0  # a save with sub-folders is a prac save: --overwrite replaces it
    assert (out / "README.md").read_text().count("## Pruned with prac") == 1
    (out / "1_Pooling" / "mine.txt").write_text("added by the user")
    _error([*args, "--overwrite"], capsys, "prac did not write 1_Pooling/mine.txt")


def test_prac_files_win_and_a_source_without_a_card_gets_one(tiny_model_dir, tmp_path):
    from prac.io.source_files import copy_source_files

    source, dest = tmp_path / "src", tmp_path / "dest"
    shutil.copytree(tiny_model_dir("mistral"), source)
    (source / "config.json").write_text('{"from": "the source"}')
    (source / "model.safetensors.index.json").write_text("{}")
    (source / "prac_report.json").write_text("{}")
    (source / "notes.txt").write_text("kept")
    dest.mkdir()
    (dest / "config.json").write_text('{"from": "prac"}')
    report = {"config": {"model": str(source), "eval": "wikitext2",
                         "prune": {"method": "sparsegpt", "pattern": {"type": "unstructured", "sparsity": 0.6},
                                   "correction": {"method": "optimal"}}},
              "summary": {"dense_ppl": 10.0, "ppl": 12.5}}
    copied = copy_source_files(str(source), dest, report)
    assert json.loads((dest / "config.json").read_text()) == {"from": "prac"}
    assert "notes.txt" in copied and "README.md" in copied
    assert not (dest / "model.safetensors").exists() and not (dest / "model.safetensors.index.json").exists()
    assert not (dest / "prac_report.json").exists()
    card = (dest / "README.md").read_text()
    assert "sparsegpt, 60% unstructured" in card and "correction: optimal" in card and "12.5000" in card


def test_a_hub_source_that_cannot_be_fetched_gets_prac_card_and_a_warning(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    from prac.io.source_files import copy_source_files

    monkeypatch.setattr(prac.model.loading, "hub_offline_reason", lambda: "HF_HUB_OFFLINE=1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    report = {"config": {"model": "org/encoder", "prune": {"method": "wanda", "pattern": {"type": "nm", "n": 2, "m": 4}}}}
    with caplog.at_level("WARNING", logger="prac"):
        assert copy_source_files("org/encoder", tmp_path, report) == ["README.md"]
    assert "could not be fetched" in caplog.text
    assert (tmp_path / "README.md").read_text().startswith("# encoder (pruned)")


# --- 3. prac eval on an encoder ----------------------------------------------------------------------

def test_eval_of_an_encoder_names_what_to_give(tiny_model_dir, small_text, no_load, capsys):
    _error(["eval", "--no-progress", "--model", str(tiny_model_dir("bert")), "--data", str(small_text)], capsys,
           "is an encoder", "--reference DENSE_MODEL")


def test_eval_of_a_pruned_encoder_reports_cosine_to_its_source(tiny_model_dir, small_text, tmp_path, capsys):
    bert = str(tiny_model_dir("bert"))
    assert main(["eval", "--no-progress", "--model", bert, "--reference", bert, "--eval", str(small_text),
                 "--seqlen", "32"]) == 0
    assert "cosine similarity of last hidden states to the reference 1.000000" in capsys.readouterr().out
    out = tmp_path / "pruned"
    assert main(["prune", "--no-progress", "--model", bert, "--calib", str(small_text), "--nsamples", "2",
                 "--seqlen", "32", "--eval", "none", "--sparsity", "0.7", "--save", str(out)]) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--no-progress", "--model", str(out), "--data", str(small_text), "--seqlen", "32",
                 "--report", str(report)]) == 0  # the source is named by the saved report
    summary = json.loads(report.read_text())["summary"]
    assert 0 < summary["cosine_similarity"] < 0.9999 and summary["status"] == "ok"
    assert f"to the reference {summary['cosine_similarity']:.6f}" in capsys.readouterr().out


def test_reference_is_refused_for_a_causal_lm(tiny_model_dir, small_text, no_load, capsys):
    model = str(tiny_model_dir("mistral"))
    _error(["eval", "--no-progress", "--model", model, "--reference", model, "--data", str(small_text)], capsys,
           "--reference", "causal LM")


# --- 4. one CLI ----------------------------------------------------------------------------------------

def test_top_level_help_lists_every_method_of_the_registry(capsys):
    from prac.cli import registry_names
    from prac.methods.registry import METHODS

    assert registry_names("prac.methods.registry", "METHODS") == tuple(METHODS)
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"({', '.join(METHODS)})" in text and "admm" in text


@pytest.mark.parametrize("command", ["prune", "eval", "verify", "spectrum"])
def test_every_command_takes_no_progress_and_eval_takes_eval(command):
    from prac.cli import build_parser

    assert build_parser().parse_args([command, "--no-progress"]).no_progress is True
    if command == "eval":
        assert build_parser().parse_args(["eval", "--eval", "a.txt"]).data == "a.txt"
        assert build_parser().parse_args(["eval", "--data", "a.txt"]).data == "a.txt"


def test_no_progress_hides_the_libraries_bars_in_verify_and_spectrum(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    for argv in (["verify", "--model", str(tmp_path / "nope")],
                 ["spectrum", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")]):
        hf_logging.enable_progress_bar()
        assert main([*argv, "--no-progress"]) == 2
        assert not hf_logging.is_progress_bar_enabled(), argv
    hf_logging.disable_progress_bar()


def test_lm_eval_bars_are_hidden_for_the_call_only():
    pytest.importorskip("lm_eval")
    import lm_eval.api.task
    import tqdm

    from prac.parallel.harness import _bars

    original = lm_eval.api.task.tqdm
    with _bars(False):
        assert lm_eval.api.task.tqdm(range(3)).disable and tqdm.tqdm(range(3)).disable
    assert lm_eval.api.task.tqdm is original and tqdm.tqdm is original
    with _bars(True):
        assert lm_eval.api.task.tqdm is original


def test_correction_summary_is_one_short_line():
    from prac.cli.prune_summary import format_correction

    c = {"layers": 28, "mean_error_before": 0.0213263, "mean_error_after": 0.00400524, "mean_reduction": 0.0173211,
         "mean_reduction_pct": 83.5553, "total_solve_failures": 0, "mean_clamped_pct": 0.0, "reverted": 0,
         "solver_stalled_rows": 6, "layers_with_solver_fallback": 3, "solver_converged": True, "refused": 2,
         "damping_escalated": 0, "heldout_layers": 28, "mean_fit_error_before": 0.0213334,
         "mean_fit_error_proposed": 0.00386579, "mean_heldout_error_before": 0.0212886,
         "mean_heldout_error_after": 0.00610375, "mean_fraction_of_optimal": 0.998609}
    line = format_correction(c, "run.json")
    assert len(line) < 200 and "\n" not in line, line
    assert "0.0213263 -> 0.00400524" in line and "83.6% lower" in line and "0.999 of optimal" in line
    assert "2 refused" in line and "3 layers on the solver's fallback" in line and "reverted" not in line


def test_spectrum_out_with_a_slash_is_a_folder(tmp_path, small_text):
    from prac.cli import build_parser
    from prac.cli.spectrum import output_paths

    text = tmp_path / "small.txt"
    text.write_text(small_text.read_text()[:4000])
    args = build_parser().parse_args(["spectrum", "--data", str(text), "--n-samples", "2", "--seqlen", "8",
                                      "--block-structure", "model", "--no-progress", "--out", f"{tmp_path}/res/"])
    paths = output_paths(args)
    assert paths["spectrum JSON"] == tmp_path / "res" / "spectrum.json"
    assert paths["spectrum CSV"] == tmp_path / "res" / "spectrum.csv"
    (tmp_path / "existing").mkdir()
    args.out, args.plot = str(tmp_path / "existing"), str(tmp_path / "figs") + "/"
    assert output_paths(args)["figure"] == tmp_path / "figs" / "spectrum.png"
    assert main(["spectrum", "--data", str(text), "--n-samples", "2", "--seqlen", "8", "--block-structure", "model",
                 "--no-progress", "--out", f"{tmp_path}/res/"]) == 0
    assert json.loads((tmp_path / "res" / "spectrum.json").read_text())["metadata"]["n_samples_used"] == 2
    assert (tmp_path / "res").is_dir() and (tmp_path / "res" / "spectrum.csv").is_file()


def test_a_report_name_ending_in_a_slash_is_refused(tiny_model_dir, tmp_path, no_load, capsys):
    _error(["prune", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--report", f"{tmp_path}/x/"],
           capsys, "ends with a slash")
