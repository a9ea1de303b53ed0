"""replay_shard: the one function that turns packed images and view parameters into pixels."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import kdcache.replay as replay
from kdcache.images import decode_packed, encode_packed
from kdcache.replay import Replayed, Unreadable, replay_shard, stored_views
from kdcache.views import apply, sample_views

V = 3


def _packed() -> dict[int, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for row in (10, 11, 13):
        pixels = rng.integers(0, 256, (20 + row, 30, 3), dtype=np.uint8)
        out[row] = encode_packed(Image.fromarray(pixels))[1]
    out[12] = b"not an image"
    return out


def test_draws_come_back_in_their_order_as_the_view_function_makes_them(monkeypatch):
    packed = _packed()
    views = np.stack([sample_views(r, 30, 20 + r, V, "default", 0, 0.875) if r != 12 else np.zeros((V, 10))
                      for r in range(10, 14)]).astype(np.float32)
    draws = [(11, 2), (12, 0), (10, 1), (11, 0), (13, 2), (12, 1), (10, 0), (11, 1)]
    decodes, asked = [], []
    real = replay.decode_packed
    monkeypatch.setattr(replay, "decode_packed", lambda data, bound=None: decodes.append(data) or real(data, bound))
    lookup = stored_views(views, first_row=10)
    got = list(replay_shard(packed, draws, lambda r, img: asked.append(r) or lookup(r, img),
                            [(16, "bicubic"), (24, "bilinear")]))
    # the unreadable row is said once, where it is first drawn, and none of its draws is replayed
    assert [(g.row, getattr(g, "view", None)) for g in got] == [(11, 2), (12, None), (10, 1), (11, 0), (13, 2),
                                                                  (10, 0), (11, 1)]
    bad = [g for g in got if isinstance(g, Unreadable)]
    assert len(bad) == 1 and bad[0].reason
    for g in got:
        if isinstance(g, Replayed):
            image = decode_packed(packed[g.row])
            assert torch.equal(g.images[0], apply(image, views[g.row - 10, g.view], 16, "bicubic"))
            assert torch.equal(g.images[1], apply(image, views[g.row - 10, g.view], 24, "bilinear"))
    # each row is decoded once and its views asked once, however often it is drawn
    row_of = {data: row for row, data in packed.items()}
    assert [row_of[d] for d in decodes] == [11, 12, 10, 13]  # in the order first drawn
    assert asked == [11, 10, 13]


def test_the_teacher_pass_may_sample_the_views_from_the_decoded_image():
    packed = _packed()
    del packed[12]
    sampled = {}

    def sample(row, image):
        _, h, w = image.shape
        sampled[row] = sample_views(row, w, h, V, "default", 0, 0.875)
        return sampled[row]

    draws = [(r, v) for r in packed for v in range(V)]
    got = list(replay_shard(packed, draws, sample, [(16, "bicubic")]))
    assert [(g.row, g.view) for g in got] == draws
    assert sorted(sampled) == sorted(packed)
    for g in got:
        assert torch.equal(g.images[0], apply(decode_packed(packed[g.row]), sampled[g.row][g.view], 16, "bicubic"))
