"""Progress reporting is injected by the caller: the library never imports tqdm itself."""

from __future__ import annotations

from collections.abc import Callable, Iterable

Progress = Callable[[Iterable, str, int], Iterable]


def no_progress(it: Iterable, desc: str, total: int) -> Iterable:
    return it


def tqdm_progress(it: Iterable, desc: str, total: int) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
