"""Exact, hand-built cases for scores and masks."""

import pytest
import torch

from prac.core.errors import PracError
from prac.methods.masks import apply_mask, magnitude_scores, mask_from_scores, prune_count, wanda_scores
from prac.methods.patterns import NM, Unstructured, parse_nm


def test_two_of_four_on_one_to_eight_with_unit_inputs():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    mask = mask_from_scores(wanda_scores(w, torch.ones(8)), NM(2, 4))
    assert apply_mask(w, mask).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_input_scaling_flips_the_choice():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    x_norm = torch.tensor([10.0, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mask = mask_from_scores(wanda_scores(w, x_norm), NM(2, 4))
    assert apply_mask(w, mask).tolist() == [[1, 2, 0, 0, 0, 0, 7, 8]]
    # magnitude ignores the inputs
    assert apply_mask(w, mask_from_scores(magnitude_scores(w), NM(2, 4))).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_unstructured_is_per_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    mask = mask_from_scores(magnitude_scores(w), Unstructured(0.5))
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_layer_scope_compares_the_whole_matrix():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    mask = mask_from_scores(magnitude_scores(w), Unstructured(0.5), scope="layer")
    assert mask.tolist() == [[True, True, True, True], [False, False, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_every_nm_group_keeps_exactly_n(n, m):
    torch.manual_seed(0)
    w = torch.randn(33, 64)
    mask = mask_from_scores(wanda_scores(w, torch.rand(64)), NM(n, m))
    kept = (~mask).reshape(33, 64 // m, m).sum(-1)
    assert torch.all(kept == n)
    assert torch.all(apply_mask(w, mask).reshape(33, -1, m).ne(0).sum(-1) == n)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.7, 0.99])
def test_unstructured_count_per_row(sparsity):
    torch.manual_seed(1)
    w = torch.randn(7, 768)
    mask = mask_from_scores(magnitude_scores(w), Unstructured(sparsity))
    assert torch.all(mask.sum(1) == prune_count(768, sparsity))


def test_ties_are_broken_by_position_deterministically():
    scores = torch.ones(2, 8)
    a = mask_from_scores(scores, Unstructured(0.5))
    b = mask_from_scores(scores.clone(), Unstructured(0.5))
    assert torch.equal(a, b)
    assert a[0].tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("text", ["5:4", "0:4", "4:4", "2-4", "a:b", "2:"])
def test_bad_nm_is_a_clear_error(text):
    with pytest.raises(PracError, match="N:M"):
        parse_nm(text)


def test_nm_must_divide_in_features():
    with pytest.raises(PracError, match="does not divide in_features=10"):
        NM(2, 4).check(10, "layer.x")


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(s):
    with pytest.raises(PracError, match=r"\[0, 1\)"):
        Unstructured(s)


def test_lowest_k_equals_a_stable_sort_with_ties():
    from prac.methods.masks import lowest_k

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 40), generator=g).float()  # many ties
    for k in (0, 1, 7, 20, 39, 40):
        ref = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            ref.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest_k(scores, k), ref), k
