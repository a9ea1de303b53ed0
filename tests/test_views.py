"""Views: explicit numbers, one pure apply shared by both stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from kdcache.views import _LUMA, PARAMS, apply, clean_view, colour_matrix, sample_views


def test_clean_view_is_a_centred_square():
    v = clean_view(200, 100, 0.875)
    side = 100 * 0.875
    assert np.allclose(v[:4], [(200 - side) / 2 / 200, (100 - side) / 2 / 100,
                               (200 + side) / 2 / 200, (100 + side) / 2 / 100])
    assert list(v[4:]) == [0, 1, 1, 1, 0, 0]


def test_views_are_deterministic_per_row_and_differ_across_rows():
    a = sample_views(5, 64, 48, 4, "default", seed=0, crop_pct=0.9)
    assert a.shape == (4, len(PARAMS)) and a.dtype == np.float32
    assert np.array_equal(a, sample_views(5, 64, 48, 4, "default", seed=0, crop_pct=0.9))
    assert not np.array_equal(a[1:], sample_views(6, 64, 48, 4, "default", seed=0, crop_pct=0.9)[1:])
    assert not np.array_equal(a[1:], sample_views(5, 64, 48, 4, "default", seed=1, crop_pct=0.9)[1:])
    boxes = sample_views(3, 64, 48, 50, "default", seed=0, crop_pct=0.9)[:, :4]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 1 + 1e-6).all() and (boxes[:, 0] < boxes[:, 2]).all()


def test_unknown_policy_lists_choices():
    with pytest.raises(ValueError, match="choose one of: default, light, noflip"):
        sample_views(0, 8, 8, 2, "strong", 0, 1.0)


def test_apply_full_box_identity_and_flip():
    img = torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 8, 8)
    full = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0], np.float32)
    assert torch.equal(apply(img, full, 8), img)  # no resize, no jitter: untouched
    flipped = full.copy()
    flipped[4] = 1
    assert torch.equal(apply(img, flipped, 8), img.flip(-1))
    left = np.array([0, 0, 0.5, 1, 0, 1, 1, 1, 0, 0], np.float32)
    assert torch.equal(apply(img, left, 4, "nearest")[:, :, :], torch.nn.functional.interpolate(
        img[None, :, :, :4].float(), size=(4, 4), mode="nearest")[0].to(torch.uint8))


def test_apply_is_pure_and_sized():
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    for p in sample_views(0, 53, 37, 6, "default", 0, 0.9):
        a, b = apply(img, p, 24), apply(img, p, 24)
        assert a.shape == (3, 24, 24) and a.dtype == torch.uint8 and torch.equal(a, b)
    gray = sample_views(0, 53, 37, 1, "default", 0, 0.9)[0].copy()
    gray[9] = 1
    g = apply(img, gray, 16)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def _reference(img, op, factor):
    return {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation}[op](img, factor)


@pytest.mark.parametrize("op,index,factor", [("brightness", 5, 1.25), ("contrast", 6, 0.7), ("contrast", 6, 1.3),
                                             ("saturation", 7, 0.6), ("saturation", 7, 1.4)])
def test_colour_map_matches_torchvision_where_nothing_clips(op, index, factor):
    img = torch.randint(70, 180, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
    p = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0], np.float32)
    p[index] = factor
    diff = (apply(img, p, 16).int() - _reference(img, op, factor).int()).abs()
    assert diff.max() <= 1  # the same map, rounded once instead of per step


def test_hue_is_a_luma_preserving_rotation_in_the_hsv_direction():
    assert np.allclose(colour_matrix(1, 1, 1, 0.0, False, 0)[0], np.eye(3))
    m, t = colour_matrix(1, 1, 1, 0.05, False, 0)
    assert np.allclose(t, 0)
    assert np.allclose(_LUMA @ m, _LUMA)  # luma unchanged by hue
    red = np.array([200.0, 60.0, 60.0])
    assert (m @ red)[1] > red[1] + 5  # a positive shift turns red towards yellow (green rises), as HSV does
    full, _ = colour_matrix(1, 1, 1, 1.0, False, 0)
    assert np.allclose(full, np.eye(3), atol=1e-9)  # a whole turn is the identity
