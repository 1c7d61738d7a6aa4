"""Zero-shot tasks through lm-evaluation-harness: a local multiple-choice task, offline.

``tests/data/zeroshot/pycode.yaml`` describes 40 items of ``pycode.jsonl`` (made by
``make_pycode.py`` from the bundled held-out text); its ``data_files`` path is relative to the
repository root, where these tests run the harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prac.core.errors import PracError
from prac.io import assets
from prac.parallel.harness import PAPER_TASKS, PRESETS, ZeroShotConfig, format_table, parse_tasks, summarize

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "zeroshot"
TASK = "prac_pycode"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_presets_and_parsing():
    assert PRESETS["paper7"] == PAPER_TASKS == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                                                "arc_challenge", "openbookqa")
    cfg = parse_tasks("rte, paper7,my_task", num_fewshot=0, limit=0.5, include_path=str(TASKS))
    assert cfg.tasks == ("rte", "boolq", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "my_task")
    assert cfg.presets == ("paper7",) and cfg.limit == 0.5 and cfg.include_path == str(TASKS)
    assert parse_tasks("x", limit=10.0).limit == 10 and isinstance(parse_tasks("x", limit=10.0).limit, int)
    for bad, kw in ((",", {}), ("x", {"limit": 0.0}), ("x", {"num_fewshot": -1}), ("x", {"include_path": "/nonexistent"})):
        with pytest.raises(PracError):
            parse_tasks(bad, **kw)


def test_summary_of_a_harness_result_and_the_table():
    out = {"results": {"boolq": {"acc,none": 0.6, "acc_stderr,none": 0.01},
                       "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.02, "acc_norm,none": 0.45,
                                    "acc_norm_stderr,none": 0.02}},
           "versions": {"boolq": 2.0, "arc_easy": 1.0}, "n-shot": {"boolq": 0, "arc_easy": 0},
           "n-samples": {"boolq": {"original": 3270, "effective": 3270}, "arc_easy": {"original": 2376, "effective": 100}},
           "lm_eval_version": "0.4.13"}
    rec = summarize(out, ZeroShotConfig(("boolq", "arc_easy"), presets=("paper7",)))
    assert rec["harness"] == "0.4.13"
    assert rec["tasks"]["boolq"] == {"acc": 0.6, "acc_stderr": 0.01, "version": 2.0, "num_fewshot": 0,
                                     "samples": 3270, "documents": 3270}
    assert rec["tasks"]["arc_easy"]["acc_norm"] == 0.45 and rec["tasks"]["arc_easy"]["samples"] == 100
    assert rec["mean"]["paper7"] == {"tasks": 2, "acc": 0.55}  # acc_norm: not every task has it
    table = format_table(rec)
    assert "boolq" in table and "0.6000 ± 0.0100" in table and "mean paper7" in table


lm_eval = pytest.importorskip("lm_eval", reason="needs pip install 'prac[eval]'")


def _prac(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prac", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, **(env or {})})


@pytest.fixture(scope="module")
def harness_reference():
    """The harness's own result for the bundled model loaded from disk by lm_eval (``model="hf"``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out = simple_evaluate(model="hf", model_args={"pretrained": str(assets.DEFAULT_MODEL), "device": "cpu",
                                                      "dtype": "float32"},
                              tasks=[TASK], batch_size=8, log_samples=False,
                              task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    finally:
        os.chdir(cwd)
    return out


@pytest.mark.slow
def test_local_task_equals_the_harness_own_result(harness_reference, tmp_path):
    report_path = tmp_path / "zs.json"
    done = _prac("eval", "--tasks", TASK, "--include-path", str(TASKS), "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--report", str(report_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert TASK in done.stdout and "acc_norm" in done.stdout and "zero-shot (lm-eval" in done.stdout
    report = json.loads(report_path.read_text())
    zs = report["summary"]["zeroshot"]
    ours, ref = zs["tasks"][TASK], harness_reference["results"][TASK]
    assert ours["acc"] == ref["acc,none"] and ours["acc_norm"] == ref["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(ref["acc_stderr,none"]) and ours["acc_norm_stderr"] > 0
    assert ours["samples"] == 40 and ours["num_fewshot"] == 0 and ours["version"] == 1.0
    assert zs["harness"] == lm_eval.__version__ and zs["batch_size"] == 8
    assert "ppl" not in report["summary"]  # --tasks alone: no perplexity pass
    assert report["summary"]["status"] == "ok" and "zeroshot" in report["summary"]["phase_seconds"]


def test_unknown_task_is_one_line():
    done = _prac("eval", "--tasks", "prac_pycod", "--include-path", str(TASKS), "--limit", "2")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "unknown zero-shot task 'prac_pycod'" in line and "prac_pycode" in line


def test_hub_task_offline_is_one_line():
    done = _prac("eval", "--tasks", "boolq", "--limit", "2")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert "zero-shot task 'boolq' could not load its data" in line and "HF_HUB_OFFLINE" in line


def test_prune_with_tasks_runs_them_on_the_pruned_model(tmp_path, tiny_model_dir, small_text, monkeypatch, one_thread):
    """``prac prune --tasks``: the pruned model in memory, a few documents, the table in the report."""
    from prac.jobs.config import PruneJob
    from prac.jobs.prune import run_prune

    monkeypatch.chdir(ROOT)
    tasks = parse_tasks(TASK, limit=6, batch_size=4, include_path=str(TASKS))
    report = run_prune(PruneJob(model=str(tiny_model_dir("mistral")), calib=str(small_text), nsamples=4, seqlen=32,
                                eval="none", tasks=tasks, report=str(tmp_path / "r.json")))
    zs = report["summary"]["zeroshot"]
    assert zs["tasks"][TASK]["samples"] == 6 and 0 <= zs["tasks"][TASK]["acc"] <= 1 and zs["limit"] == 6
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["config"]["evaluation"]["zeroshot"]["tasks"] == [TASK]
    assert written["summary"]["zeroshot"]["tasks"][TASK]["acc_norm"] == zs["tasks"][TASK]["acc_norm"]


def test_tasks_options_without_tasks_are_refused():
    done = _prac("eval", "--limit", "3")
    assert done.returncode == 2 and "--limit given without --tasks" in done.stderr
