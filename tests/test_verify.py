"""`prac verify` passes on a healthy model and catches a broken invariant."""

import pytest
import torch

from prac.cli import main
from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig
from prac.io.data import load_calibration
from prac.jobs.verify import check_none_identical, format_table, run_checks
from prac.methods.patterns import Unstructured
from prac.model.stats import InputStats
from tests.conftest import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calib(small_text, tokenizer):
    return load_calibration(str(small_text), tokenizer, nsamples=4, seqlen=32, seed=0).input_ids


def test_all_checks_pass_on_a_tiny_model(calib):
    model = make_tiny_model("mistral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checks = run_checks(model, calib, PruneConfig(pattern=Unstructured(0.6), engine=EngineConfig(batch_size=2)), CPU)
    assert len(checks) == 9 and all(c.passed for c in checks), format_table(checks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "verify must not modify the model"


def test_a_salience_that_depends_on_the_collection_mode_is_caught(calib, monkeypatch):
    # Inject the prototype's bug: L2 salience from a different quantity when the Hessian is held.
    honest = InputStats.l2.fget
    monkeypatch.setattr(InputStats, "l2", property(lambda self: honest(self) * (1 + torch.linspace(0, 1, self.dim))
                                                   if self.hessian is not None else honest(self)))
    check = check_none_identical(make_tiny_model("mistral"), calib, PruneConfig(engine=EngineConfig(batch_size=2)), CPU)
    assert not check.passed and "full" in check.detail and "optimal" in check.detail


def test_cli_exit_code(tiny_model_dir, small_text, capsys):
    code = main(["verify", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text), "--nsamples", "4",
                 "--seqlen", "32"])
    out = capsys.readouterr().out
    assert code == 0 and "FAIL" not in out and "9 passed, 0 failed" in out


def test_unknown_method_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--method", "wandaa", "--model", "/does/not/matter"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 2
    assert err[0].startswith("prac verify: error: argument --method: invalid choice: 'wandaa'") and "sparsegpt" in err[0]


def test_help_is_plain_text_and_explains_every_option(capsys):
    import argparse

    from prac.cli import build_parser

    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":mod:" not in text and "bit for bit" in text
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    verify = sub.choices["verify"].build()
    assert all(action.help for action in verify._actions), [a.dest for a in verify._actions if not a.help]
