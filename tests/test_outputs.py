"""Never destroy what the user had: outputs checked first, written atomically, --overwrite only over prac's own files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from prac.cli import main
from prac.io.outputs import REPORT_NAME, Outputs, StagedDir, remove_stale_temporaries, stage_json

from .conftest import tree_state


@pytest.fixture
def work(tmp_path, tiny_model_dir, small_text):
    """A private copy of a tiny model and of the calibration text, and the arguments of a quick prune."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("mistral"), model)
    calib = tmp_path / "calib.txt"
    shutil.copy(small_text, calib)
    args = ["prune", "--no-progress", "--model", str(model), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--eval", "none"]
    return tmp_path, model, calib, args


def _error(code, capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "error:" in err[0], err
    for n in needles:
        assert n in err[0], err[0]


def test_report_over_the_source_model_is_refused(work, capsys):
    root, model, _, args = work
    before = tree_state(root)
    _error(main([*args, "--report", str(model / "config.json")]), capsys, "inside the source model's folder")
    _error(main([*args, "--report", str(model / "new.json")]), capsys, "inside the source model's folder")
    assert tree_state(root) == before


def test_report_over_an_input_or_a_folder_is_refused(work, capsys):
    root, _, calib, args = work
    before = tree_state(root)
    _error(main([*args, "--report", str(calib)]), capsys, "is an input of this run")
    _error(main([*args, "--report", str(root)]), capsys, "is a folder")
    _error(main([*args, "--report", str(calib / "r.json")]), capsys, "is a file, not a folder")
    assert tree_state(root) == before


def test_report_inside_the_save_folder_is_refused(work, capsys):
    root, _, _, args = work
    _error(main([*args, "--save", str(root / "out"), "--report", str(root / "out" / "r.json")]), capsys,
           "inside the --save folder")
    assert not (root / "out").exists()


def test_overwrite_refuses_foreign_files_and_names_them(work, capsys):
    root, _, _, args = work
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    before = tree_state(root)
    _error(main([*args, "--save", str(out), "--overwrite"]), capsys, "not written by prac", "notes.txt", "sub/")
    assert tree_state(root) == before


def test_overwrite_never_touches_a_folder_holding_an_input(work, capsys):
    root, model, calib, args = work
    out = root / "out"
    assert main([*args, "--save", str(out)]) == 0
    shutil.copy(calib, out / "calib.txt")
    capsys.readouterr()
    before = tree_state(root)
    args = [a if a != str(calib) else str(out / "calib.txt") for a in args]
    _error(main([*args, "--save", str(out), "--overwrite"]), capsys, "holds an input of this run")
    assert tree_state(root) == before


def test_overwrite_replaces_a_previous_prac_save_keeping_the_folder_mode(work, capsys):
    root, _, _, args = work
    out = root / "out"
    assert main([*args, "--save", str(out), "--sparsity", "0.3"]) == 0
    out.chmod(0o751)
    capsys.readouterr()
    first = json.loads((out / REPORT_NAME).read_text())
    assert REPORT_NAME in first["saved_files"] and "model.safetensors" in first["saved_files"]
    assert set(first["saved_files"]) == {p.name for p in out.iterdir()}
    assert main([*args, "--save", str(out), "--overwrite", "--sparsity", "0.6"]) == 0
    second = json.loads((out / REPORT_NAME).read_text())
    assert abs(second["summary"]["sparsity"] - 0.6) < 0.01
    assert out.stat().st_mode & 0o777 == 0o751
    (out / "extra.txt").write_text("added by the user")
    _error(main([*args, "--save", str(out), "--overwrite"]), capsys, "prac did not write extra.txt")
    assert (out / "extra.txt").read_text() == "added by the user"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_honour_the_umask(work, mask):
    root, _, _, args = work
    old = os.umask(mask)
    try:
        assert main([*args, "--save", str(root / "out"), "--report", str(root / "r" / "run.json")]) == 0
    finally:
        os.umask(old)
    assert (root / "r" / "run.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (root / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    for p in (root / "out").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_a_failed_save_leaves_no_report(work, monkeypatch, capsys):
    root, _, _, args = work
    from transformers import PreTrainedModel

    def broken(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    before = tree_state(root)
    with pytest.raises(OSError):
        main([*args, "--save", str(root / "out"), "--report", str(root / "run.json")])
    assert tree_state(root) == before


def test_staged_outputs_land_together_or_not_at_all(tmp_path):
    def fail(_tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            outputs.add(stage_json(tmp_path / "a.json", {"x": float("nan")}))
            outputs.add(StagedDir(tmp_path / "d", fail))
    assert list(tmp_path.iterdir()) == []
    with Outputs() as outputs:
        outputs.add(stage_json(tmp_path / "a.json", {"x": float("nan"), "y": float("inf")}))
        outputs.commit()
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": "inf"}


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    mine = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    mine.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [stale]
    assert mine.exists() and not stale.exists()


_SLOW_SAVE = """
import signal, sys, time
# Ctrl-C as in a foreground run: a shell that starts the test suite in the background (`… &`) passes
# SIGINT on ignored, and Python keeps an ignored SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from transformers import PreTrainedModel
orig = PreTrainedModel.save_pretrained
def slow(self, path, *a, **k):
    orig(self, path, *a, **k)
    Path(sys.argv[1]).write_text("saving")
    time.sleep(60)
PreTrainedModel.save_pretrained = slow
from prac.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_save_leaves_nothing(work, sig, code):
    root, _, _, args = work
    marker = root / "marker"
    before = tree_state(root)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(marker), *args, "--save", str(root / "out"),
                             "--report", str(root / "run.json")], stderr=subprocess.PIPE, text=True)
    while not marker.exists() and proc.poll() is None:  # however long a busy machine takes to get there
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no save started"
    proc.send_signal(sig)
    try:  # read stderr while waiting (a full pipe would block the child), and show it on failure
        _, err = proc.communicate(timeout=600)  # an exit is seconds; the limit only ends a hang
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no exit within 600 s of {sig.name}; stderr:\n{err[-3000:]}")
    assert proc.returncode == code, err[-3000:]
    assert "nothing was written" in err
    marker.unlink()
    assert tree_state(root) == before


@pytest.mark.parametrize("option,name", [("--report", "notes.txt"), ("--plot", "picture.png")])
def test_a_single_file_prac_did_not_write_is_refused_unless_overwrite(work, capsys, option, name):
    root, _, _, args = work
    mine = root / name
    mine.write_bytes(b"the user's own file")
    extra = ["--allocation", "owl"] if option == "--plot" else []
    before = tree_state(root)
    _error(main([*args, *extra, option, str(mine)]), capsys, repr(str(mine)), "not written by prac", "--overwrite")
    assert tree_state(root) == before
    assert main([*args, *extra, option, str(mine), "--overwrite"]) == 0
    assert mine.read_bytes() != b"the user's own file"


def test_files_prac_wrote_are_replaced_without_overwrite(work, capsys):
    from prac.io.outputs import written_by_prac

    root, _, _, args = work
    report, plot = root / "run.json", root / "plan.svg"
    for _ in range(2):  # the second run replaces the first run's report and figure
        assert main([*args, "--allocation", "owl", "--report", str(report), "--plot", str(plot)]) == 0
    assert written_by_prac(report) and written_by_prac(plot)
    capsys.readouterr()
    for other in ("other.json", "other.svg", "other.csv"):
        (root / other).write_text('{"environment": {}}' if other.endswith("json") else "x")
        assert not written_by_prac(root / other)


@pytest.mark.parametrize("argv", [["--save", ""], ["--report", ""], ["--report", " "]])
def test_an_empty_output_path_is_an_error(work, capsys, argv):
    root, _, _, args = work
    before = tree_state(root)
    _error(main([*args, *argv]), capsys, "empty")
    assert tree_state(root) == before


def test_eval_and_spectrum_outputs_follow_the_same_rule(work, capsys):
    root, model, calib, _ = work
    mine = root / "mine.json"
    mine.write_text("{}")
    _error(main(["eval", "--model", str(model), "--data", str(calib), "--seqlen", "32", "--report", str(mine)]),
           capsys, "not written by prac")
    _error(main(["spectrum", "--model", str(model), "--data", str(calib), "--n-samples", "2", "--seqlen", "16",
                 "--out", str(mine), "--no-progress"]), capsys, "not written by prac")
    assert mine.read_text() == "{}"
