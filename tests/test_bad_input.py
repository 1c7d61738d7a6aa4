"""Bad input is one line on stderr, exit code 2, and the file tree exactly as it was (issue 13);
and the report says honestly what happened (phases, memory, non-finite results, protocol, threads)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prac.cli import main
from prac.core.errors import PracError
from prac.io import assets
from prac.io.data import MIN_CALIB_SEQLEN, MIN_CALIB_TOKENS

from .conftest import VOCAB, tree_state

SMALL = ["--nsamples", "4", "--seqlen", "32"]


@pytest.fixture
def work(tmp_path, tiny_model_dir, small_text):
    """A private tree: a copy of a tiny Mistral and of the text; everything a run could touch is in it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("mistral"), model)
    text = tmp_path / "text.txt"
    shutil.copy(small_text, text)
    return tmp_path, model, text


def _one_line_error(argv, capsys, root: Path, *needles: str) -> str:
    """Run the CLI; assert exit 2, exactly one line on stderr naming ``needles``, ``root`` unchanged."""
    before = tree_state(root)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert "error:" in err[0] and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    assert tree_state(root) == before
    return err[0]


def _prune(model, text, *extra):
    return ["prune", "--no-progress", "--model", str(model), "--calib", str(text), *SMALL, "--eval", "none", *extra]


def _write_bad_text(root: Path, kind: str) -> Path:
    if kind == "latin1":
        path = root / "latin1.txt"
        path.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 500)
    elif kind == "binary":
        path = root / "binary.txt"
        path.write_bytes(bytes(range(256)) * 200)
    else:  # jsonl with a non-UTF-8 line
        path = root / "docs.jsonl"
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    return path


# --- binary or non-UTF-8 text, in every command -------------------------------------------------

@pytest.mark.parametrize("kind,needle", [("latin1", "not UTF-8 text (byte 0xe9"), ("binary", "binary, not text"),
                                         ("jsonl", "not UTF-8 text")])
def test_prune_refuses_non_utf8_calibration_text(kind, needle, work, capsys):
    root, model, _ = work
    bad = _write_bad_text(root, kind)
    _one_line_error(_prune(model, bad, "--report", str(root / "r.json")), capsys, root, needle, bad.name)


def test_eval_refuses_non_utf8_data(work, capsys):
    root, model, _ = work
    bad = _write_bad_text(root, "latin1")
    _one_line_error(["eval", "--no-progress", "--model", str(model), "--data", str(bad), "--seqlen", "32",
                     "--report", str(root / "r.json")], capsys, root, "not UTF-8 text")


def test_prune_refuses_binary_eval_text(work, capsys):
    root, model, text = work
    bad = _write_bad_text(root, "binary")
    argv = _prune(model, text)
    argv[argv.index("--eval") + 1] = str(bad)
    _one_line_error(argv, capsys, root, "binary, not text")


def test_spectrum_refuses_non_utf8_data(work, capsys):
    root, model, _ = work
    bad = _write_bad_text(root, "latin1")
    _one_line_error(["spectrum", "--no-progress", "--model", str(model), "--data", str(bad), "--n-samples", "2",
                     "--seqlen", "16", "--out", str(root / "s.json")], capsys, root, "not UTF-8 text")


def test_verify_refuses_non_utf8_calibration(work, capsys):
    root, model, _ = work
    bad = _write_bad_text(root, "binary")
    _one_line_error(["verify", "--model", str(model), "--calib", str(bad), "--nsamples", "2", "--seqlen", "16"],
                    capsys, root, "binary, not text")


# --- truncated weights ----------------------------------------------------------------------------

def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_truncated_weights(command, work, capsys):
    root, model, text = work
    _truncate(model)
    argv = (_prune(model, text) if command == "prune"
            else ["eval", "--no-progress", "--model", str(model), "--data", str(text), "--seqlen", "32"])
    _one_line_error([*argv, "--report", str(root / "r.json")], capsys, root, "truncated or corrupt", str(model))


# --- --ignore ---------------------------------------------------------------------------------------

def test_invalid_ignore_regex_is_refused_before_the_model_is_loaded(work, capsys):
    root, model, text = work
    _truncate(model)  # loading it would fail: the regex error must come first
    _one_line_error(_prune(model, text, "--ignore", "["), capsys, root, "--ignore '['", "not a valid regular expression")


def test_ignore_everything_is_refused(work, capsys):
    root, model, text = work
    _one_line_error(_prune(model, text, "--ignore", ".", "--save", str(root / "out")), capsys, root,
                    "nothing to prune", "all 14 prunable layers")


# --- calibration tokens ------------------------------------------------------------------------------

def _tokens(root: Path, ids: torch.Tensor) -> Path:
    path = root / "tokens.safetensors"
    save_file({"input_ids": ids}, str(path))
    return path


@pytest.mark.parametrize("bad_id,needle", [(VOCAB, f"token id {VOCAB}"), (VOCAB + 1000, "outside the model's vocabulary"),
                                           (-1, "negative token id -1")])
def test_calibration_tokens_outside_the_vocabulary(bad_id, needle, work, capsys):
    root, model, _ = work
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    ids[2, 5] = bad_id
    path = _tokens(root, ids)
    _one_line_error(["prune", "--no-progress", "--model", str(model), "--calib-tokens", str(path), "--eval", "none",
                     "--report", str(root / "r.json")], capsys, root, needle)


def test_one_token_calibration_rows_are_refused(work, capsys):
    root, model, _ = work
    path = _tokens(root, torch.arange(4).reshape(4, 1))
    _one_line_error(["prune", "--no-progress", "--model", str(model), "--calib-tokens", str(path), "--eval", "none"],
                    capsys, root, "rows of 1 token(s)", f"at least {MIN_CALIB_SEQLEN} tokens per row")


def test_short_text_calibration_windows_are_refused(work, capsys):
    root, model, text = work
    argv = _prune(model, text)
    argv[argv.index("--seqlen") + 1] = "4"
    _one_line_error(argv, capsys, root, "rows of 4 token(s)")


def test_few_calibration_tokens_warn_loudly(work, capsys):
    root, model, _ = work
    n, seqlen = 2, MIN_CALIB_SEQLEN * 2  # 32 tokens: allowed, but not quietly
    path = _tokens(root, torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(1)))
    assert main(["prune", "--no-progress", "--model", str(model), "--calib-tokens", str(path), "--eval", "none"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and f"only {n * seqlen} tokens" in err and str(MIN_CALIB_TOKENS) in err


def test_calibration_token_rows_beyond_the_context(work, capsys):
    root, model, _ = work
    path = _tokens(root, torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(0)))
    _one_line_error(["prune", "--no-progress", "--model", str(model), "--calib-tokens", str(path), "--eval", "none"],
                    capsys, root, "rows of 300 tokens", "context of 256")


# --- sequence lengths beyond the model's context, in every command -------------------------------------

@pytest.mark.parametrize("arch", ["mistral", "bert"])
def test_prune_seqlen_beyond_context(arch, tmp_path, tiny_model_dir, small_text, capsys):
    model = tiny_model_dir(arch)
    argv = ["prune", "--no-progress", "--model", str(model), "--calib", str(small_text), "--nsamples", "2",
            "--seqlen", "512", "--eval", "none", "--save", str(tmp_path / "out")]
    _one_line_error(argv, capsys, tmp_path, "--seqlen 512", "context of 256 tokens")


def test_prune_eval_seqlen_beyond_context(work, capsys):
    root, model, text = work
    argv = _prune(model, text, "--eval-seqlen", "257")
    argv[argv.index("--eval") + 1] = str(text)
    _one_line_error(argv, capsys, root, "--eval-seqlen 257", "context of 256 tokens")


def test_eval_seqlen_beyond_context(work, capsys):
    root, model, text = work
    _one_line_error(["eval", "--no-progress", "--model", str(model), "--data", str(text), "--seqlen", "300"],
                    capsys, root, "--seqlen 300", "context of 256 tokens")


def test_verify_seqlen_beyond_context(work, capsys):
    root, model, text = work
    _one_line_error(["verify", "--model", str(model), "--calib", str(text), "--nsamples", "1", "--seqlen", "1024"],
                    capsys, root, "--seqlen 1024", "context of 256 tokens")


# --- non-finite weights -------------------------------------------------------------------------------

def _poison(model: Path, name: str, value: float) -> None:
    state = load_file(str(model / "model.safetensors"))
    state[name][3, 7] = value
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("method,value", [("magnitude", float("nan")), ("wanda", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor(method, value, work, capsys):
    root, model, text = work
    _poison(model, "model.layers.1.mlp.up_proj.weight", value)
    _one_line_error(_prune(model, text, "--method", method, "--save", str(root / "out")), capsys, root,
                    "NaN/Inf", "model.layers.1.mlp.up_proj.weight", "NaN" if value != value else "Inf")


def test_eval_refuses_non_finite_weights(work, capsys):
    root, model, text = work
    _poison(model, "model.embed_tokens.weight", float("nan"))
    _one_line_error(["eval", "--no-progress", "--model", str(model), "--data", str(text), "--seqlen", "32"],
                    capsys, root, "model.embed_tokens.weight")


# --- a hub id offline -------------------------------------------------------------------------------

@pytest.fixture
def connections(monkeypatch) -> list:
    """Every host name the process looks up and every TCP connection it tries, made as usual: "at once"
    without a clock means no attempt at all offline, and one probe (no retries) when the hub does not
    answer. (A lookup is counted too: without DNS an attempt stops there, before any connect.)"""
    import socket

    import prac.model.loading

    tried: list = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def counted(self, address):
        tried.append(("connect", address))
        return connect(self, address)

    def counted_ex(self, address):
        tried.append(("connect", address))
        return connect_ex(self, address)

    def looked_up(host, port, *args, **kwargs):
        tried.append(("lookup", host, port))
        return getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", counted)
    monkeypatch.setattr(socket.socket, "connect_ex", counted_ex)
    monkeypatch.setattr(socket, "getaddrinfo", looked_up)
    prac.model.loading._probe.cache_clear()  # an earlier test's probe must not answer for this one
    yield tried
    prac.model.loading._probe.cache_clear()


def test_hub_id_offline_fails_at_once(tmp_path, monkeypatch, capsys, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(["prune", "--no-progress", "--model", "no-such-org/no-such-model", "--report",
                     str(tmp_path / "r.json")], capsys, tmp_path, "no-such-org/no-such-model", "HF_HUB_OFFLINE=1")
    assert connections == [], connections  # offline: the hub is never asked


def test_hub_id_without_network_fails_at_once(tmp_path, monkeypatch, capsys, connections):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    _one_line_error(["eval", "--no-progress", "--model", "no-such-org/no-such-model"], capsys, tmp_path,
                    "cannot be reached", "unreachable")
    # one probe of the endpoint, no retries of the hub client
    assert connections == [("lookup", "127.0.0.1", 9), ("connect", ("127.0.0.1", 9))], connections


# --- library-level checks the CLI relies on -------------------------------------------------------------

def test_check_calibration_directly():
    from prac.io.data import TokenSet, check_calibration

    good = TokenSet(torch.zeros(16, 8, dtype=torch.int64), {"source": "tokens"})
    assert check_calibration(good, vocab_size=10, context=8) is good
    with pytest.raises(PracError, match="beyond the model's context of 4"):
        check_calibration(good, vocab_size=10, context=4)
    with pytest.raises(PracError, match="outside the model's vocabulary of 1"):
        check_calibration(TokenSet(torch.ones(16, 8, dtype=torch.int64)), vocab_size=1)


# === honest reports ===================================================================================

@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, small_text):
    """One prune of the tiny Mistral with evaluation, saved, with the progress labels it used."""
    from prac.jobs.config import PruneJob
    from prac.jobs.prune import run_prune

    root = tmp_path_factory.mktemp("pruned")
    job = PruneJob(model=str(tiny_model_dir("mistral")), calib=str(small_text), nsamples=4, seqlen=32,
                   eval=str(small_text), eval_seqlen=64, save=str(root / "out"), report=str(root / "r.json"))
    labels: list[str] = []

    def progress(it, desc, total):
        labels.append(desc)
        return it

    report = run_prune(job, progress)
    return root, report, labels


def test_report_has_every_phase_and_both_memory_peaks(pruned):
    _, report, _ = pruned
    s = report["summary"]
    assert {"load", "dense_eval", "pruned_eval"} <= set(s["phase_seconds"])
    assert all(s["phase_seconds"][k] >= 0 for k in ("load", "dense_eval", "pruned_eval"))
    phases = s["peak_memory_by_phase"]
    assert set(phases) == {"load", "dense_eval", "prune", "pruned_eval"} and all(v > 0 for v in phases.values())
    assert s["peak_memory_bytes"] == max(phases.values())
    assert s["process_peak_rss_bytes"] >= s["peak_memory_bytes"]
    assert s["peak_memory_kind"] in ("process_peak_rss", "process_peak_rss_cumulative")
    assert s["status"] == "ok"


def test_dense_and_pruned_evaluation_bars_have_distinct_labels(pruned):
    _, _, labels = pruned
    assert "dense eval" in labels and "pruned eval" in labels


def test_report_records_the_thread_count(pruned):
    root, report, _ = pruned
    env = json.loads((root / "r.json").read_text())["environment"]
    assert env["cpu_threads"] == torch.get_num_threads() and env["interop_threads"] >= 1


def test_eval_of_a_saved_model_reuses_its_protocol(pruned, small_text):
    from prac.jobs.config import EvalJob
    from prac.jobs.eval import run_eval

    root, prune_report, _ = pruned
    saved = json.loads((root / "out" / "prac_report.json").read_text())["config"]
    assert saved["seqlen"] == 32 and saved["eval_seqlen"] == 64 and saved["eval"] == str(small_text)
    report = run_eval(EvalJob(model=str(root / "out")))
    assert report["config"]["defaults_from"] == "prac_report.json of the saved model"
    assert report["config"]["data_resolved"] == str(small_text)
    assert report["summary"]["seqlen"] == 64
    assert math.isclose(report["summary"]["ppl"], prune_report["summary"]["ppl"], rel_tol=1e-9)
    assert run_eval(EvalJob(model=str(root / "out"), seqlen=32))["summary"]["seqlen"] == 32  # given: used


def test_a_copy_of_the_bundled_model_gets_the_bundled_defaults(tmp_path):
    from prac.jobs.defaults import folder_defaults

    copy = tmp_path / "copy"
    shutil.copytree(assets.DEFAULT_MODEL, copy)
    bundled, origin = folder_defaults(str(assets.DEFAULT_MODEL), None)
    assert origin == "bundled model" and bundled["seqlen"] == assets.DEFAULT_MODEL_SEQLEN
    same, origin = folder_defaults(str(copy), None)
    assert same == bundled and origin.startswith("copy of the bundled model")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    other, origin = folder_defaults(str(copy), None)
    assert origin == "model config" and other["calib"] == "c4" and other["eval"] == "none"


def _overflowing_model(tiny_model_dir, root: Path) -> Path:
    """Finite weights whose logits overflow float32: every perplexity is NaN."""
    model = root / "overflow"
    shutil.copytree(tiny_model_dir("mistral"), model)
    state = load_file(str(model / "model.safetensors"))
    state["lm_head.weight"] = torch.full_like(state["lm_head.weight"], 3e38)
    state["lm_head.weight"][::2] *= -1
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_non_finite_perplexity_is_null_with_a_status(tmp_path, tiny_model_dir, small_text):
    from prac.jobs.config import EvalJob, PruneJob
    from prac.jobs.eval import run_eval
    from prac.jobs.prune import run_prune

    model = _overflowing_model(tiny_model_dir, tmp_path)
    report = run_prune(PruneJob(model=str(model), calib=str(small_text), nsamples=4, seqlen=32, eval=str(small_text),
                                report=str(tmp_path / "r.json")))
    assert report["summary"]["status"] == "not_finite"
    assert set(report["summary"]["not_finite"]) == {"dense_ppl", "ppl"}
    written = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert written["ppl"] is None and written["dense_ppl"] is None and written["status"] == "not_finite"
    ev = run_eval(EvalJob(model=str(model), data=str(small_text), seqlen=32, report=str(tmp_path / "e.json")))
    assert ev["summary"]["status"] == "not_finite" and ev["summary"]["finite"] is False
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["ppl"] is None


def test_finite_eval_has_status_ok(tiny_model_dir, small_text):
    from prac.jobs.config import EvalJob
    from prac.jobs.eval import run_eval

    s = run_eval(EvalJob(model=str(tiny_model_dir("mistral")), data=str(small_text), seqlen=64))["summary"]
    assert s["status"] == "ok" and s["finite"] is True and "eval" in s["phase_seconds"]
    assert s["peak_memory_bytes"] > 0 and s["process_peak_rss_bytes"] >= s["peak_memory_bytes"]
