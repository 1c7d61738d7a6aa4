"""The CLI: bad input gives one clear line, exit code 2, and writes nothing; good input writes reports."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from prac.cli import main
from prac.core.errors import PracError
from prac.model.blocks import find_blocks


def _run(argv, capsys):
    code = main(["prune", "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    last = err[-1]
    assert last.startswith("prac prune: error:") or "error:" in last
    for n in needles:
        assert n in last, last
    assert not any("Traceback" in line for line in err)


@pytest.fixture
def small(small_text):
    return ["--calib", str(small_text), "--nsamples", "4", "--seqlen", "32", "--eval", "none"]


def test_missing_model_path(tmp_path, capsys):
    code, err = _run(["--model", str(tmp_path / "nope"), "--report", str(tmp_path / "r.json")], capsys)
    _assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "r.json").exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    code, err = _run(["--model", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "no config.json")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "abc"])
def test_sparsity_out_of_range(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--sparsity", value])
    assert exc.value.code == 2
    assert "sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("nm,needle", [("5:4", "1 <= N < M"), ("0:4", "1 <= N < M"), ("2x4", "malformed"),
                                       ("3:7", "does not divide in_features")])
def test_bad_nm(nm, needle, tiny_model_dir, small, tmp_path, capsys):
    code, err = _run(["--model", str(tiny_model_dir("mistral")), "--nm", nm, *small,
                      "--report", str(tmp_path / "r.json")], capsys)
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r.json").exists()


def test_calibration_too_short(tiny_model_dir, small_text, tmp_path, capsys):
    code, err = _run(["--model", str(tiny_model_dir("mistral")), "--calib", str(small_text), "--nsamples", "128",
                      "--seqlen", "256", "--eval", "none", "--save", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, "too short", "tokens", "needs 32769")
    assert not (tmp_path / "out").exists()


def test_output_folder_cannot_be_the_source(tiny_model_dir, small, capsys):
    src = tiny_model_dir("mistral")
    before = sorted(p.name for p in src.iterdir())
    code, err = _run(["--model", str(src), *small, "--save", str(src)], capsys)
    _assert_one_line_error(code, err, "would overwrite the source model")
    assert sorted(p.name for p in src.iterdir()) == before


def test_non_empty_output_needs_overwrite(tiny_model_dir, small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["--model", str(tiny_model_dir("mistral")), *small, "--save", str(out)], capsys)
    _assert_one_line_error(code, err, "not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_architecture_lists_what_was_found():
    with pytest.raises(PracError, match=r"no repeated blocks.*ModuleLists: no ModuleList"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(PracError, match=r"heads\[2 x Identity\]"):
        model = torch.nn.Module()
        model.heads = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        find_blocks(model)


def test_nan_statistics_name_the_layer(tiny_model_dir, small, tmp_path, capsys):
    src = tiny_model_dir("mistral")
    bad = tmp_path / "nan-model"
    shutil.copytree(src, bad)
    from safetensors.torch import load_file

    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, err = _run(["--model", str(bad), *small, "--report", str(tmp_path / "r.json")], capsys)
    _assert_one_line_error(code, err, "NaN/Inf", "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "r.json").exists()


def test_prune_writes_report_and_model(tiny_model_dir, small_text, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "run.json"
    code = main(["prune", "--no-progress", "--model", str(tiny_model_dir("gpt2")), "--calib", str(small_text),
                 "--nsamples", "4", "--seqlen", "32", "--eval", str(small_text), "--eval-seqlen", "64",
                 "--sparsity", "0.6", "--save", str(out), "--report", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity: dense" in printed
    data = json.loads(report.read_text())
    assert set(data) == {"config", "environment", "layers", "summary", "saved"}
    assert data["saved"]["format"] == "dense"
    assert data["saved"]["weight_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert {"python", "torch", "transformers", "prac", "device"} <= set(data["environment"])
    assert data["config"]["seqlen"] == 32 and data["config"]["eval_seqlen"] == 64
    assert data["config"]["calibration"]["protocol"] == "stream"
    assert {"name", "shape", "sparsity"} <= set(data["layers"][0])
    s = data["summary"]
    assert abs(s["sparsity"] - 0.6) < 0.01 and s["ppl"] > 1 and s["dense_ppl"] > 1  # random model: no order
    assert {"prune_seconds", "peak_memory_bytes"} <= set(s)
    assert json.loads((out / "prac_report.json").read_text())["summary"] == s
    from prac.model.loading import load_model

    reloaded = load_model(str(out))
    w = reloaded.transformer.h[0].mlp.c_fc.weight
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.01
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_encoder_reports_cosine_similarity(tiny_model_dir, small_text, capsys):
    code = main(["prune", "--no-progress", "--model", str(tiny_model_dir("bert")), "--calib", str(small_text),
                 "--nsamples", "4", "--seqlen", "32", "--eval", str(small_text)])
    assert code == 0
    assert "cosine similarity of last hidden states to dense" in capsys.readouterr().out


def test_eval_command(tiny_model_dir, small_text, capsys):
    assert main(["eval", "--no-progress", "--model", str(tiny_model_dir("mistral")), "--data", str(small_text),
                 "--seqlen", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--calib-tokens", "--nm", "--correction", "--save", "--report", "--device", "calibration protocols"):
        assert flag in text


def test_argument_error_is_one_line_and_a_pointer_to_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--sparsity", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err == ["prac prune: error: argument --sparsity: sparsity must be in [0, 1), got 2.0",
                   "see 'prac prune --help'"]
    with pytest.raises(SystemExit):
        main(["prun"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("prac: error: argument COMMAND: invalid choice")
    assert err[1] == "see 'prac --help'"


def test_top_level_help_imports_nothing_heavy():
    script = ("import sys\nfrom prac.cli import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'torch.func', 'prac.spectral', 'numpy')"
              " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "[]", lines[-1]
    assert all(f"  {name} " in done.stdout for name in ("prune", "eval", "verify", "spectrum"))


def test_no_measure_is_a_deprecated_alias_of_no_exact_errors(capsys):
    from prac.cli import build_parser, prune_job_from_args

    old = build_parser().parse_args(["prune", "--correction", "diagonal", "--no-measure"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "prac prune: warning: --no-measure is deprecated; use --no-exact-errors"]
    new = build_parser().parse_args(["prune", "--correction", "diagonal", "--no-exact-errors"])
    assert capsys.readouterr().err == ""
    assert prune_job_from_args(old) == prune_job_from_args(new)
    assert prune_job_from_args(new).prune.correction.exact_errors is False
    default = prune_job_from_args(build_parser().parse_args(["prune", "--correction", "diagonal"]))
    assert default.prune.correction.exact_errors is True and default.prune.collect is None
    measured = prune_job_from_args(build_parser().parse_args(["prune", "--measure"]))
    assert measured.prune.collect.hessian and measured.prune.correction.exact_errors is True


def test_prune_help_shows_percent_signs_and_memory_costs(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "50% Wanda" in text and "%%" not in text
    assert "--exact-errors" in text and "--no-exact-errors" in text and "784 MiB" in text
    assert "--no-measure" not in text  # deprecated: works, not advertised


def test_non_finite_result_prints_nan_and_exits_1(capsys):
    from prac.cli import eval as eval_cmd
    from prac.cli import prune as prune_cmd

    summary = {"pruned_layers": 28, "sparsity": 0.5, "prune_seconds": 1.25, "peak_memory_bytes": 2**21,
               "dense_ppl": 61.4437, "ppl": None, "status": "not_finite",
               "correction": {"method": "optimal", "mean_reduction": None}}
    report = {"config": {"blocks": "model.layers"}, "summary": summary}
    assert prune_cmd.print_summary(report, report_path="r.json") == 1
    out, err = capsys.readouterr()
    assert "perplexity: dense 61.4437 -> pruned nan" in out and "correction: mean error nan -> nan" in out
    assert "r.json" in out
    assert err.strip() == "prac prune: the result is not usable (status not_finite)"
    assert prune_cmd.print_summary({**report, "summary": {**summary, "ppl": 63.4, "status": "ok"}}) == 0
    assert "pruned 63.4000" in capsys.readouterr().out
    assert prune_cmd.print_summary({**report, "summary": {k: v for k, v in summary.items() if k != "status"}}) == 0
    capsys.readouterr()
    assert eval_cmd.print_summary({"ppl": None, "windows": 3, "seqlen": 64, "predicted_tokens": 189,
                                   "status": "not_finite"}) == 1
    out, err = capsys.readouterr()
    assert out.startswith("perplexity nan over 3 windows") and "not usable" in err


@pytest.fixture
def restore_prac_logging():
    logger = logging.getLogger("prac")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_verbose_and_debug_set_the_prac_logger(restore_prac_logging, capsys):
    from argparse import Namespace

    from prac.cli import configure_logging

    configure_logging(Namespace(verbose=True, debug=False))
    assert restore_prac_logging.getEffectiveLevel() == logging.INFO
    logging.getLogger("prac.jobs.prune").info("calibration: 4 x 32 tokens")
    logging.getLogger("prac.jobs.prune").debug("hidden at -v")
    err = capsys.readouterr().err
    assert "INFO prac.jobs.prune: calibration: 4 x 32 tokens" in err and "hidden" not in err
    configure_logging(Namespace(verbose=False, debug=True))
    assert restore_prac_logging.getEffectiveLevel() == logging.DEBUG
    configure_logging(Namespace(verbose=False, debug=False))
    assert restore_prac_logging.getEffectiveLevel() == logging.WARNING
    assert sum(1 for h in restore_prac_logging.handlers if type(h).__name__ == "_StderrHandler") == 1


def test_prune_verbose_logs_each_phase(tiny_model_dir, small, restore_prac_logging, capsys):
    assert main(["prune", "--no-progress", "-v", "--model", str(tiny_model_dir("mistral")), *small]) == 0
    err = capsys.readouterr().err
    assert "INFO prac.jobs.prune: calibration: 4 x 32 tokens" in err and "INFO prac.jobs.prune: pruned" in err


@pytest.mark.parametrize("flags, expected", [(["--method", "admm"], True), (["--method", "sparsegpt"], False),
                                             (["--method", "admm", "--no-dense-target"], False),
                                             (["--method", "wanda", "--dense-target"], True)])
def test_dense_target_is_on_by_default_for_admm_only(flags, expected, tiny_model_dir, small, tmp_path, capsys):
    report = tmp_path / "run.json"
    code, err = _run(["--model", str(tiny_model_dir("mistral")), *small, "--sparsity", "0.5", *flags,
                      "--report", str(report)], capsys)
    assert code == 0, err
    engine = json.loads(report.read_text())["config"]["prune"]["engine"]
    assert engine["dense_target"] is expected
    assert json.loads(report.read_text())["config"]["prune"]["dense_target_damping"] == 0.01
    assert engine["replay"] is True


def test_no_replay_gives_the_same_model(tiny_model_dir, small, tmp_path, capsys):
    """``--no-replay`` reaches the config, and a sequential run without it saves the same weights."""
    saved = {}
    for flag in ("--replay", "--no-replay"):
        out, report = tmp_path / flag, tmp_path / f"{flag}.json"
        code, err = _run(["--model", str(tiny_model_dir("mistral")), *small, "--method", "admm", "--sparsity", "0.6",
                          flag, "--save", str(out), "--report", str(report)], capsys)
        assert code == 0, err
        assert json.loads(report.read_text())["config"]["prune"]["engine"]["replay"] is (flag == "--replay")
        saved[flag] = (out / "model.safetensors").read_bytes()
    assert saved["--replay"] == saved["--no-replay"]


def test_dense_target_damping_must_be_positive(tiny_model_dir, small, capsys):
    code, err = _run(["--model", str(tiny_model_dir("mistral")), *small, "--method", "admm",
                      "--dense-target-damping", "0"], capsys)
    _assert_one_line_error(code, err, "dense-target damping")
