"""Replayable augmentation: views are explicit numbers, applied by one pure function.

A view is a float32 vector (see PARAMS). View 0 is the clean evaluation view (resize + centre
crop by crop_pct); views 1..V-1 come from a named policy, drawn from an RNG keyed by
(seed, row) so resuming or splitting work over ranks draws the same numbers. Only the numbers
are stored in the cache, so replay never depends on an RNG implementation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .options import ConfigError
from .registry import Registry

PARAMS = ("x0", "y0", "x1", "y1", "flip", "brightness", "contrast", "saturation", "hue", "gray")
P = len(PARAMS)
IDENTITY_TAIL = np.array([0, 1, 1, 1, 0, 0], np.float32)  # flip .. gray for an untouched view

POLICIES = Registry("view policy", ConfigError)
POLICY_DEFAULTS: dict[str, dict] = {}  # each policy's parameters (recorded in the cache)


def register_policy(name: str, **defaults):
    POLICY_DEFAULTS[name] = defaults
    return POLICIES.register(name, **defaults)


def list_policies() -> list[str]:
    return POLICIES.names()


def clean_view(width: int, height: int, crop_pct: float) -> np.ndarray:
    """Resize the shorter side to size/crop_pct, centre-crop size: a centred square box."""
    side = min(width, height) * min(crop_pct, 1.0)
    bw, bh = side / width, side / height
    x0, y0 = (1 - bw) / 2, (1 - bh) / 2
    return np.concatenate([[x0, y0, x0 + bw, y0 + bh], IDENTITY_TAIL]).astype(np.float32)


def _random_resized_box(rng, width, height, scale, ratio) -> list[float]:
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return [x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height]
    # fall back to the largest centred box within the ratio bounds
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    w, h = min(w, width), min(h, height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return [x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height]


@register_policy("default", scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5,
                 jitter=(0.3, 0.3, 0.3, 0.05), jitter_p=0.8, gray=0.1)
def _default_policy(rng, width, height, scale, ratio, flip, jitter, jitter_p, gray) -> np.ndarray:
    box = _random_resized_box(rng, width, height, scale, ratio)
    f = float(rng.random() < flip)
    b, c, s, h = 1.0, 1.0, 1.0, 0.0
    if rng.random() < jitter_p:
        b = rng.uniform(1 - jitter[0], 1 + jitter[0])
        c = rng.uniform(1 - jitter[1], 1 + jitter[1])
        s = rng.uniform(1 - jitter[2], 1 + jitter[2])
        h = rng.uniform(-jitter[3], jitter[3])
    g = float(rng.random() < gray)
    return np.array(box + [f, b, c, s, h, g], np.float32)


@register_policy("light", scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5)
def _light_policy(rng, width, height, scale, ratio, flip) -> np.ndarray:
    box = _random_resized_box(rng, width, height, scale, ratio)
    return np.concatenate([box, [float(rng.random() < flip)], IDENTITY_TAIL[1:]]).astype(np.float32)


@register_policy("noflip", scale=(0.7, 1.0), ratio=(4 / 5, 5 / 4), jitter=(0.2, 0.2))
def _noflip_policy(rng, width, height, scale, ratio, jitter) -> np.ndarray:
    """For inputs where a mirror image is another thing (digits, text): crops and light jitter only."""
    box = _random_resized_box(rng, width, height, scale, ratio)
    b = rng.uniform(1 - jitter[0], 1 + jitter[0])
    c = rng.uniform(1 - jitter[1], 1 + jitter[1])
    return np.array(box + [0.0, b, c, 1.0, 0.0, 0.0], np.float32)


def sample_views(row: int, width: int, height: int, num_views: int, policy: str, seed: int,
                 crop_pct: float) -> np.ndarray:
    """[V, P] view parameters for one image; view 0 is the clean view."""
    draw = POLICIES.get(policy)
    rng = np.random.default_rng([seed, row])
    views = [clean_view(width, height, crop_pct)]
    for _ in range(1, num_views):
        views.append(draw(rng, width, height, **POLICY_DEFAULTS[policy]))
    return np.stack(views)


def _interp(name: str) -> InterpolationMode:
    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}.get(name, InterpolationMode.BICUBIC)


# Replay version: bumped whenever `apply` would turn the same numbers into different pixels. A cache
# records it, and stage two refuses a cache whose views it would replay differently.
REPLAY_VERSION = 2

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, so the whole colour jitter is linear.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_LUMA = _RGB2YIQ[0]
_LUMA_T = torch.from_numpy(_LUMA).float()


def colour_matrix(brightness: float, contrast: float, saturation: float, hue: float, gray: bool,
                  mean_luma: float) -> tuple[np.ndarray, np.ndarray]:
    """The colour jitter as one affine map, out = M @ rgb + t, composed in the order
    brightness, contrast, saturation, hue, grayscale. `mean_luma` is the crop's mean luma before
    jitter (contrast blends towards the mean luma of its input). `hue` is a fraction of a turn."""
    eye = np.eye(3)
    m = eye * brightness
    t = np.zeros(3)
    mean = brightness * mean_luma  # luma is linear, so the mean after brightness is known up front
    m, t = contrast * m, contrast * t + (1 - contrast) * mean
    to_gray = np.outer(np.ones(3), _LUMA)
    sat = saturation * eye + (1 - saturation) * to_gray
    m, t = sat @ m, sat @ t
    if hue:
        c, s = np.cos(2 * np.pi * hue), -np.sin(2 * np.pi * hue)  # positive turns red towards yellow, as HSV
        rot = _YIQ2RGB @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _RGB2YIQ
        m, t = rot @ m, rot @ t
    if gray:
        m, t = to_gray @ m, to_gray @ t
    return m, t


def apply(image: torch.Tensor, params, out_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Apply one view to a uint8 [3, H, W] image; returns uint8 [3, out_size, out_size].

    Crop and resize (antialiased), flip, then the colour jitter as a single affine map in float32,
    rounded and clamped once at the end."""
    p = [float(v) for v in params]
    _, height, width = image.shape
    left = min(int(round(p[0] * width)), width - 1)
    top = min(int(round(p[1] * height)), height - 1)
    crop_w = max(1, min(int(round((p[2] - p[0]) * width)), width - left))
    crop_h = max(1, min(int(round((p[3] - p[1]) * height)), height - top))
    out = TF.resized_crop(image, top, left, crop_h, crop_w, [out_size, out_size],
                          interpolation=_interp(interpolation), antialias=True)
    if p[4] >= 0.5:
        out = out.flip(-1)
    if p[5:] == [1.0, 1.0, 1.0, 0.0, 0.0]:
        return out.contiguous()
    x = out.reshape(3, -1).to(torch.float32)
    mean_luma = float(_LUMA_T @ x.mean(dim=1)) if p[6] != 1.0 else 0.0
    m, t = colour_matrix(p[5], p[6], p[7], p[8], p[9] >= 0.5, mean_luma)
    y = torch.addmm(torch.from_numpy(t.astype(np.float32))[:, None], torch.from_numpy(m.astype(np.float32)), x)
    return y.round_().clamp_(0, 255).to(torch.uint8).reshape(3, out_size, out_size)
