"""A method's CLI flags come from its settings dataclass: a toy method registered in a temporary registry
gets its flag in ``prac prune --help``, and the value given on the command line reaches its settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from prac.cli import build_parser, main
from prac.cli import prune as prune_cli
from prac.cli.settings_flags import flags
from prac.core.errors import PracError
from prac.correction import corrections
from prac.correction.base import Correction, Proposal
from prac.methods.masks import MaskResult, apply_mask, magnitude_scores, mask_from_scores
from prac.methods.registry import METHODS, Method


@dataclass(frozen=True)
class ToySettings:
    knob: int = field(default=3, metadata={"flag": "--toy-knob", "min": 1, "help": "toy: how far the knob turns"})
    hidden: float = 0.5  # no metadata: no flag


SEEN: list[ToySettings] = []


def toy(weight, group, pattern, settings: ToySettings) -> MaskResult:
    SEEN.append(settings)
    mask = mask_from_scores(magnitude_scores(weight), pattern)
    return MaskResult(apply_mask(weight, mask), mask)


@dataclass(frozen=True)
class ToyFixSettings:
    strength: float = field(default=0.25, metadata={"flag": "--toy-strength", "help": "toyfix: how hard"})


@pytest.fixture
def toy_registries(monkeypatch):
    SEEN.clear()
    monkeypatch.setitem(METHODS, "toy", Method(toy, ToySettings, None, "a toy mask source"))
    monkeypatch.setitem(corrections(), "toyfix", Correction(
        name="toyfix", settings=ToyFixSettings, propose=lambda problem, settings: Proposal(None, None),
        stats=lambda s, exact_errors, seed: None, description="a toy correction"))


def _job(*argv):
    return prune_cli.prune_job_from_args(build_parser().parse_args(["prune", *argv]))


def test_the_toy_flags_appear_in_the_help_with_their_defaults(toy_registries, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--toy-knob TOY_KNOB toy: how far the knob turns (default: toy 3)" in text
    assert "--toy-strength TOY_STRENGTH toyfix: how hard (default: toyfix 0.25)" in text
    assert "{magnitude,wanda,sparsegpt,admm,toy}" in text and "--hidden" not in text


def test_the_given_values_reach_the_toy_settings(toy_registries):
    assert _job("--method", "toy").prune.settings == ToySettings()
    job = _job("--method", "toy", "--toy-knob", "7", "--correction", "toyfix", "--toy-strength", "0.5")
    assert job.prune.settings == ToySettings(knob=7)
    assert job.prune.correction.settings == ToyFixSettings(strength=0.5)
    assert _job("--correction", "toyfix").prune.correction.settings == ToyFixSettings()


def test_a_toy_flag_is_refused_by_the_other_methods_and_checked_by_its_type(toy_registries, capsys):
    with pytest.raises(PracError, match="'wanda' has no such setting: --toy-knob"):
        _job("--method", "wanda", "--toy-knob", "7")
    with pytest.raises(PracError, match="'toy' has no such setting: --scope"):
        _job("--method", "toy", "--scope", "row")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--method", "toy", "--toy-knob", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_whole_prune_hands_the_toy_method_its_settings(toy_registries, capsys):
    code = main(["prune", "--no-progress", "--method", "toy", "--toy-knob", "7", "--nsamples", "4", "--seqlen", "64",
                 "--eval", "none"])
    assert code == 0, capsys.readouterr().err
    assert SEEN and all(s == ToySettings(knob=7) for s in SEEN)


def test_one_flag_of_several_methods_lists_each_default_and_must_be_declared_alike(monkeypatch):
    scope = flags(METHODS)["--scope"]
    assert scope.defaults() == "magnitude row, wanda row, admm layer"
    assert flags(METHODS)["--blocksize"].defaults() == "sparsegpt 128, admm 128"

    @dataclass(frozen=True)
    class Clash:
        scope: str = field(default="row", metadata={"flag": "--scope", "help": "something else"})

    monkeypatch.setitem(METHODS, "clash", Method(toy, Clash, None, "declares --scope its own way"))
    with pytest.raises(TypeError, match="--scope is declared differently"):
        flags(METHODS)
