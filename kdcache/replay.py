"""Replaying a shard's views: packed image bytes and view parameters in, pixels out.

Every consumer of the cached views (the teacher pass, the training stream, the benchmarks and the
tests) calls `replay_shard`, so the pixels a student sees are the ones the teacher saw: the same
decoder (`images.decode_packed`) and the same view function (`views.apply`), in one place.

What differs between consumers is only which (row, view) pairs they want and in what order: the
teacher pass wants every view of every row, in (row, view) order; the training stream wants one view
per draw of a row, in a shuffled order where a row may recur. Both are a list of draws here.

A cache made with mixed views (kdcache.mixing) also gives each row's mix records (`mix_of`): a mixed view
is the row's own view mixed with a view of its partner row (decoded from the same `packed` shard) by
`mixing.mix_pixels`, at each output size.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .images import BadImage, decode_packed
from .mixing import is_mixed, mix_pixels, partner_row, partner_view
from .views import apply, sample_views


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
MixOf = Callable[[int], np.ndarray]  # row -> that row's mix records [V, M] (asked after its views)


def stored_views(views: np.ndarray, first_row: int = 0) -> ViewsOf:
    """The views recorded in the cache: `views[row - first_row]` (an array of a shard, or of all rows)."""
    return lambda row, image: views[row - first_row]


def fresh_views(num_views: int, policy: str, crop_pct: float, seed: int) -> ViewsOf:
    """Views drawn anew from the cache's view policy, keyed by (seed, row) rather than read from the cache: view 0
    stays the clean view, views 1..V-1 are crops the teacher never saw at extraction (`distill --online-views
    fresh`, where the teacher runs on every step)."""
    return lambda row, image: sample_views(row, image.shape[-1], image.shape[-2], num_views, policy, seed, crop_pct)


def replay_shard(packed: Mapping[int, bytes], draws: Iterable[tuple[int, int]], views_of: ViewsOf,
                 outputs: Sequence[tuple[int, str]], image_bound: int | None = None, mix_of: MixOf | None = None,
                 first_row: int = 0) -> Iterator[Replayed | Unreadable]:
    """Replay `draws`, (row, view) pairs in the order wanted, from `packed` (row -> packed bytes).

    Each row is decoded once, when first drawn, and its image kept only while later draws of it remain.
    `views_of(row, image)` gives the row's view parameters, asked once per row: the cache's recorded
    views, or (in the teacher pass) views sampled from the image's size. A row that does not decode
    yields one `Unreadable` (the first time it is drawn) and none of its draws. With `mix_of` (row -> mix
    records; partners are rows of the shard starting at `first_row`), a mixed draw whose partner does not
    decode yields an `Unreadable` of its row for that draw alone.
    """
    draws = [(int(r), int(v)) for r, v in draws]
    remaining = Counter(r for r, _ in draws)
    decoded: dict[int, tuple[torch.Tensor, np.ndarray, np.ndarray | None]] = {}
    partners = _Partners(packed, image_bound)
    unreadable: set[int] = set()
    for row, view in draws:
        remaining[row] -= 1
        if row in unreadable:
            continue
        if row in decoded:
            image, views, mixes = decoded[row]
        else:
            try:
                image = decode_packed(packed[row], image_bound)
            except BadImage as e:
                unreadable.add(row)
                yield Unreadable(row, str(e))
                continue
            views = views_of(row, image)
            mixes = mix_of(row) if mix_of is not None else None
        if remaining[row] > 0:
            decoded[row] = (image, views, mixes)
        else:
            decoded.pop(row, None)
        own = tuple(apply(image, views[view], size, interp) for size, interp in outputs)
        if mixes is None or not is_mixed(mixes[view]):
            yield Replayed(row, view, own)
            continue
        record = mixes[view]
        other = partner_row(record, first_row)
        try:
            partner = partners.get(other)
        except BadImage as e:
            yield Unreadable(row, f"mix partner row {other} does not decode: {e}")
            continue
        yield Replayed(row, view, tuple(mix_pixels(o, apply(partner, partner_view(record), size, interp), record)
                                        for o, (size, interp) in zip(own, outputs)))


class _Partners:
    """Decoded partner images of mixed views, a few kept (a partner often serves several draws of a chunk)."""

    KEEP = 32

    def __init__(self, packed: Mapping[int, bytes], image_bound: int | None):
        self.packed, self.image_bound, self.images = packed, image_bound, {}

    def get(self, row: int) -> torch.Tensor:
        if row not in self.images:
            if row not in self.packed:
                raise BadImage("its packed image is missing or damaged")
            if len(self.images) >= self.KEEP:
                self.images.pop(next(iter(self.images)))
            self.images[row] = decode_packed(self.packed[row], self.image_bound)
        return self.images[row]
