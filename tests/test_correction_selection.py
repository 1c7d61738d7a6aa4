"""Selection strategies and config validation: exact hand-built cases."""

import pytest
import torch

from prac.core.errors import PracError
from prac.correction import CorrectionConfig, stats_spec
from prac.correction.selection import candidate_order, kneedle_index, select, selection_counts
from prac.engine.config import EngineConfig

# One row, 10 inputs. Scores by column; columns 1 and 6 are pruned.
SCORES = torch.tensor([[5.0, 10.0, 9.0, 3.0, 8.0, 1.0, 2.0, 7.0, 6.0, 4.0]])
MASK = torch.zeros(1, 10, dtype=torch.bool)
MASK[0, [1, 6]] = True
# Survivors by descending score: col2(9) col4(8) col7(7) col8(6) col0(5) col9(4) col3(3) col5(1).


def cols(selected: torch.Tensor, row: int = 0) -> set[int]:
    return set(selected[row].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("top", {2, 4}),
        ("weakest", {3, 5}),
        ("moderate", {8, 0}),  # n=8, k=2: ranks 3..4
        ("all", {0, 2, 3, 4, 5, 7, 8, 9}),
    ],
)
def test_strategies_exact(strategy, expected):
    sel = select(SCORES, MASK, strategy, 0.25)  # k = ceil(0.25 * 8) = 2
    assert cols(sel) == expected
    assert not (sel & MASK).any()


def test_ceil_of_percent_is_exact_and_per_row():
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[1, :10] = True  # 20 survivors
    mask[2, :] = True  # no survivors
    n, k = selection_counts(mask, 0.1)
    assert n.tolist() == [30, 20, 0]
    assert k.tolist() == [3, 2, 0]  # 0.1 * 30 is 3.0000000000000004 in floating point, still 3
    assert selection_counts(mask, 0.11)[1].tolist() == [4, 3, 0]


def test_rows_with_different_masks_are_selected_independently():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    mask = torch.tensor([[False, False, False, False], [True, False, True, False]])
    sel = select(scores, mask, "top", 0.5)
    assert cols(sel, 0) == {0, 1}
    assert cols(sel, 1) == {1}  # 2 survivors, k = 1: the best survivor, not the best column


def test_kneedle_on_obvious_knee():
    curve = torch.tensor([[100.0, 50.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    n = torch.tensor([12])
    assert kneedle_index(curve, n).tolist() == [2]
    # Shuffle the columns: selection must find the same scores from rank 2 on.
    perm = torch.tensor([5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6])
    scores = torch.empty_like(curve)
    scores[0, perm] = curve[0]
    sel = select(scores, torch.zeros_like(scores, dtype=torch.bool), "kneedle", 0.25)  # k = 3
    assert sorted(scores[sel].tolist()) == [8.0, 9.0, 10.0]


def test_kneedle_window_shifts_left_at_the_tail_and_ignores_pruned():
    # Knee at the last survivors: a steady fall then a cliff. Pruned columns must not take part.
    scores = torch.tensor([[10.0, 9.9, 9.8, 9.7, 9.6, 9.5, 0.1, 99.0]])
    mask = torch.tensor([[False] * 7 + [True]])
    n, k = selection_counts(mask, 0.5)  # n = 7, k = 4
    order = torch.sort(scores.masked_fill(mask, float("-inf")), descending=True).values
    assert kneedle_index(order, n).tolist() == [5]
    sel = select(scores, mask, "kneedle", 0.5)
    assert cols(sel) == {3, 4, 5, 6}  # ranks 3..6: shifted from 5 to n - k
    assert not (sel & mask).any()


def test_kneedle_degenerate_rows():
    curve = torch.tensor([[3.0, 3.0, 3.0, 3.0], [2.0, 1.0, 0.0, 0.0]])
    assert kneedle_index(curve, torch.tensor([4, 2])).tolist() == [0, 0]  # flat; too short


def test_candidate_order_weakest_first_and_padded():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    selected = torch.tensor([[True, True, True, False], [False, True, False, False]])
    idx, valid = candidate_order(scores, selected, ascending=True)
    assert idx.shape == (2, 3)
    assert idx[0].tolist() == [0, 2, 1]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert idx[1, 0].item() == 1
    assert len(set(idx[1].tolist())) == 3  # padding never repeats a column


def test_selection_is_vectorised_at_size_and_deterministic():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 128, generator=g)
    mask = torch.rand(64, 128, generator=g) < 0.5
    for strategy in ("top", "moderate", "weakest", "kneedle"):
        a, b = select(scores, mask, strategy, 0.1), select(scores, mask, strategy, 0.1)
        assert torch.equal(a, b)
        assert torch.equal(a.sum(1), selection_counts(mask, 0.1)[1])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(method="fancy"), "method 'fancy'"),
        (dict(method="full", selection_strategy="best"), "selection strategy 'best'"),
        (dict(method="full", percent_change=0.0), "percent-change"),
        (dict(method="full", percent_change=1.5), "percent-change"),
        (dict(method="full", damping=-1e-3), "damping"),
        (dict(method="full", damping=float("nan")), "damping"),
        (dict(method="full", max_correction_magnitude=0.0), "max-correction-magnitude"),
        (dict(method="greedy", correction_magnitude=-0.01), "correction-magnitude"),
        (dict(method="greedy", max_activation_samples=0), "max-activation-samples"),
        (dict(method="greedy", patience=0), "patience"),
        (dict(method="optimal", tol=0.0), "tolerance"),
        (dict(method="optimal", max_iter=0), "iterations"),
    ],
)
def test_validate_rejects_with_one_line(kwargs, fragment):
    with pytest.raises(PracError) as info:
        CorrectionConfig.of(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_engine_config_rejects_with_one_line():
    with pytest.raises(PracError, match="layer-batch-size"):
        EngineConfig(layer_batch_size=-1)


def test_defaults_and_stats_spec():
    assert [CorrectionConfig.of(m).settings.selection_strategy for m in ("full", "diagonal", "greedy", "optimal")] == [
        "top", "moderate", "weakest", "all"
    ]
    CorrectionConfig()
    none = stats_spec(CorrectionConfig(method="none"))
    assert not none.hessian and none.max_samples == 0
    assert stats_spec(CorrectionConfig.of("full", exact_errors=False)).hessian
    assert stats_spec(CorrectionConfig.of("optimal", exact_errors=False)).hessian
    greedy = stats_spec(CorrectionConfig.of("greedy", exact_errors=False, max_activation_samples=100, seed=3))
    assert (greedy.hessian, greedy.max_samples, greedy.seed) == (False, 100, 3)
    assert stats_spec(CorrectionConfig.of("greedy")).hessian  # measure: exact errors + yardstick
    diag = stats_spec(CorrectionConfig.of("diagonal", exact_errors=False))
    assert not diag.hessian and diag.max_samples > 0  # the never-worse check needs some data
    assert stats_spec(CorrectionConfig.of("diagonal")).max_samples == 0
