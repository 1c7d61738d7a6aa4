"""Which surviving weights a correction may change, chosen per output row.

Each row ranks its survivors (``~mask``) by Wanda score, highest first; the strategy picks a
window of ``k = ceil(percent_change * survivors)`` consecutive ranks:

- ``top``      ranks ``[0, k)``
- ``moderate`` ranks ``[floor((n - k) / 2), ... + k)`` (the middle of the ranking)
- ``weakest``  ranks ``[n - k, n)``
- ``kneedle``  ranks ``[knee, knee + k)``, shifted left to fit, where ``knee`` is the Kneedle point of
  the row's descending score curve
- ``all``      every survivor (``percent_change`` is ignored)

Everything is computed for all rows at once from one stable sort, so rows with different masks
(and so different survivor counts) need no Python loop.
"""

from __future__ import annotations

import torch

from prac.correction.base import STRATEGIES

# ceil(p * n) in floating point: 0.1 * 30 is 3.0000000000000004, which would give 4. The slack is
# far below 1 / n for any real layer width, so it only removes representation noise.
_CEIL_SLACK = 1e-9


def selection_counts(mask: torch.Tensor, percent_change: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row survivor count ``n`` and ``k = ceil(percent_change * n)`` (int64 [out] each)."""
    n = (~mask).sum(dim=1)
    k = torch.ceil(n.double() * percent_change - _CEIL_SLACK).clamp(min=0).to(torch.int64)
    return n, torch.minimum(k, n)


def ranked_survivors(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by descending score with pruned positions last, and the sorted scores.

    The sort is stable, so equal scores keep their column order (deterministic ties). Pruned
    entries get -inf and therefore sort behind every survivor.
    """
    keyed = scores.float().masked_fill(mask, float("-inf"))
    sorted_scores, order = torch.sort(keyed, dim=1, descending=True, stable=True)
    return order, sorted_scores


def kneedle_index(sorted_scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Kneedle knee of each row's descending curve ``sorted_scores[i, :n_i]`` (int64 [out]).

    Both the rank ``r`` and the score ``y`` are normalised to [0, 1] (``x = r / (n - 1)``,
    ``y' = (y - y_min) / (y_max - y_min)``); the chord of a descending curve is ``1 - x``, and the
    knee is the rank with the largest ``|y' - (1 - x)|`` (first one on ties). Rows with fewer than
    three survivors or a flat curve have no knee and get 0.
    """
    rows, cols = sorted_scores.shape
    rank = torch.arange(cols, device=sorted_scores.device).expand(rows, cols)
    valid = rank < n.unsqueeze(1)
    last = (n - 1).clamp(min=0).unsqueeze(1)
    y = sorted_scores.masked_fill(~valid, 0.0)
    y_max = y[:, :1]
    y_min = y.gather(1, last)
    span = y_max - y_min
    y_norm = (y - y_min) / torch.where(span > 0, span, torch.ones_like(span))
    x = rank.to(y.dtype) / last.clamp(min=1).to(y.dtype)
    gap = (y_norm - (1.0 - x)).abs().masked_fill(~valid, -1.0)
    knee = gap.argmax(dim=1)
    has_knee = (n >= 3) & (span.squeeze(1) > 0)
    return torch.where(has_knee, knee, torch.zeros_like(knee))


def _window_start(strategy: str, n: torch.Tensor, k: torch.Tensor, sorted_scores: torch.Tensor) -> torch.Tensor:
    if strategy == "top":
        return torch.zeros_like(n)
    if strategy == "weakest":
        return n - k
    if strategy == "moderate":
        return torch.div(n - k, 2, rounding_mode="floor")
    if strategy == "kneedle":
        # A knee near the tail would leave fewer than k ranks; shift the window left to keep k.
        return torch.minimum(kneedle_index(sorted_scores, n), n - k)
    raise ValueError(f"unknown selection strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def select(scores: torch.Tensor, mask: torch.Tensor, strategy: str, percent_change: float) -> torch.Tensor:
    """Bool [out, in]: the surviving weights each row may correct (never a pruned one)."""
    if scores.shape != mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(mask.shape)} differ in shape")
    if strategy == "all":
        return ~mask
    order, sorted_scores = ranked_survivors(scores, mask)
    n, k = selection_counts(mask, percent_change)
    start = _window_start(strategy, n, k, sorted_scores).unsqueeze(1)
    rank = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    in_window = (rank >= start) & (rank < start + k.unsqueeze(1))
    return torch.zeros_like(mask).scatter_(1, order, in_window)


def candidate_order(
    scores: torch.Tensor, selected: torch.Tensor, ascending: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions of each row in visiting order, padded: (idx int64 [out, K], valid bool [out, K]).

    ``K`` is the largest selection count of any row. ``ascending`` visits the weakest first. Padding
    slots point at unselected columns (a row's ``idx`` is a permutation prefix, so never a duplicate).
    """
    fill = float("inf") if ascending else float("-inf")
    keyed = scores.float().masked_fill(~selected, fill)
    order = torch.sort(keyed, dim=1, descending=not ascending, stable=True).indices
    counts = selected.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    valid = torch.arange(width, device=selected.device).unsqueeze(0) < counts.unsqueeze(1)
    return order[:, :width], valid
