"""Replaying a shard's views: packed image bytes and view parameters in, pixels out.

Every consumer of the cached views (the teacher pass, the training stream, the benchmarks and the
tests) calls `replay_shard`, so the pixels a student sees are the ones the teacher saw: the same
decoder (`images.decode_packed`) and the same view function (`views.apply`), in one place.

What differs between consumers is only which (row, view) pairs they want and in what order: the
teacher pass wants every view of every row, in (row, view) order; the training stream wants one view
per draw of a row, in a shuffled order where a row may recur. Both are a list of draws here.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .images import BadImage, decode_packed
from .views import apply


@dataclass(frozen=True)
class Replayed:
    """One draw replayed: the view of `row`, at each requested (size, interpolation)."""

    row: int
    view: int
    images: tuple[torch.Tensor, ...]  # uint8 [3, size, size], one per output


@dataclass(frozen=True)
class Unreadable:
    """A row whose packed image does not decode; its draws are skipped."""

    row: int
    reason: str


ViewsOf = Callable[[int, torch.Tensor], np.ndarray]  # (row, decoded image) -> that row's views [V, P]


def stored_views(views: np.ndarray, first_row: int = 0) -> ViewsOf:
    """The views recorded in the cache: `views[row - first_row]` (an array of a shard, or of all rows)."""
    return lambda row, image: views[row - first_row]


def replay_shard(packed: Mapping[int, bytes], draws: Iterable[tuple[int, int]], views_of: ViewsOf,
                 outputs: Sequence[tuple[int, str]], image_bound: int | None = None
                 ) -> Iterator[Replayed | Unreadable]:
    """Replay `draws`, (row, view) pairs in the order wanted, from `packed` (row -> packed bytes).

    Each row is decoded once, when first drawn, and its image kept only while later draws of it remain.
    `views_of(row, image)` gives the row's view parameters, asked once per row: the cache's recorded
    views, or (in the teacher pass) views sampled from the image's size. A row that does not decode
    yields one `Unreadable` (the first time it is drawn) and none of its draws.
    """
    draws = [(int(r), int(v)) for r, v in draws]
    remaining = Counter(r for r, _ in draws)
    decoded: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    unreadable: set[int] = set()
    for row, view in draws:
        remaining[row] -= 1
        if row in unreadable:
            continue
        if row in decoded:
            image, views = decoded[row]
        else:
            try:
                image = decode_packed(packed[row], image_bound)
            except BadImage as e:
                unreadable.add(row)
                yield Unreadable(row, str(e))
                continue
            views = views_of(row, image)
        if remaining[row] > 0:
            decoded[row] = (image, views)
        else:
            decoded.pop(row, None)
        yield Replayed(row, view, tuple(apply(image, views[view], size, interp) for size, interp in outputs))
