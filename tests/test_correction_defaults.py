"""Each method's own defaults are filled in, and explicit settings win."""

import math

import pytest

from prac.cli import build_parser, prune_job_from_args
from prac.core.errors import PracError
from prac.correction import CorrectionConfig


@pytest.mark.parametrize("method,strategy,pc,clamp", [
    ("full", "top", 0.2, 0.2), ("diagonal", "moderate", 0.05, 0.05),
    ("greedy", "weakest", 0.05, math.inf), ("optimal", "all", 0.05, math.inf)])
def test_method_defaults(method, strategy, pc, clamp):
    cfg = CorrectionConfig.of(method).settings  # the method's own dataclass holds its defaults
    assert (cfg.selection_strategy, cfg.percent_change, getattr(cfg, "max_correction_magnitude", math.inf)) == (
        strategy, pc, clamp)


def test_explicit_settings_win_and_cli_resolves():
    cfg = CorrectionConfig.of("full", percent_change=0.05, max_correction_magnitude=0.05, damping=0.1).settings
    assert (cfg.percent_change, cfg.max_correction_magnitude, cfg.damping) == (0.05, 0.05, 0.1)
    args = build_parser().parse_args(["prune", "--correction", "diagonal", "--no-clamp"])
    resolved = prune_job_from_args(args).prune.correction.settings
    assert resolved.max_correction_magnitude == math.inf and resolved.selection_strategy == "moderate"
    args = build_parser().parse_args(["prune", "--correction", "optimal", "--optimal-tol", "0.01"])
    assert prune_job_from_args(args).prune.correction.settings.tol == 0.01


def test_bad_settings_are_one_line_errors():
    with pytest.raises(PracError, match="max-correction-magnitude"):
        CorrectionConfig.of("full", max_correction_magnitude=-1.0)
    args = build_parser().parse_args(["prune", "--correction", "full", "--percent-change", "1.5"])
    with pytest.raises(PracError, match="percent-change"):
        prune_job_from_args(args)
    args = build_parser().parse_args(["prune", "--correction", "optimal", "--optimal-tol", "0"])
    with pytest.raises(PracError, match="optimal tolerance"):
        prune_job_from_args(args)
