"""Mixed views: mixup and cutmix recorded as explicit numbers, and replayed on uint8 views by one function.

A mixed view of row r blends r's own view with a view of a partner row p of the same shard (packed images
are read per shard, so the training stream replays it from the shard it already holds, in lockstep with
the cache). Per (row, view) the cache's `mix` array records MIX_FIELDS: the kind (0 none, 1 mixup,
2 cutmix), the partner's row within the shard, lambda (the weight of r's own image and label), the cutmix
box in relative coordinates, and the partner's own view parameters (drawn by the same policy from the
partner's size). Everything is drawn from an RNG keyed by (seed, row, view), so resuming or splitting a
pass over ranks draws the same numbers. View 0, the clean view, is never mixed.

Pixels (`mix_pixels`): mixup blends the two uint8 views in float32 and rounds once; cutmix pastes the
partner's view into the box, scaled to each output size by rounding the relative coordinates, and its
lambda is 1 - the relative box area. Imports views only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .views import P, PARAMS, POLICIES, POLICY_DEFAULTS

MIX_MODES = ("none", "mixup", "cutmix", "both")
NONE, MIXUP, CUTMIX = 0, 1, 2
MIX_FIELDS = ("kind", "partner", "lam", "box_x0", "box_y0", "box_x1", "box_y1") + tuple(f"partner_{p}" for p in PARAMS)
M = len(MIX_FIELDS)
_BOX, _VIEW = slice(3, 7), slice(7, 7 + P)
# a partner is a row within its shard, stored as a float32: exact up to 2**24
MAX_MIX_SHARD = 2 ** 24
_MIX_STREAM = 5  # the RNG key's last number, apart from the other streams keyed by (seed, row, ...)


@dataclass(frozen=True)
class MixSettings:
    """How views are mixed (--mix, --mix-prob, --mix-alpha), as the cache identity records it."""

    mode: str = "none"
    prob: float = 0.5  # the chance that a view other than view 0 is mixed
    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def identity(self) -> dict:
        return {"mode": self.mode, "prob": self.prob, "alpha": self.alpha, "fields": list(MIX_FIELDS)}


def unmixed(views: int) -> np.ndarray:
    """[V, M] records of views that are not mixed (kind 0, lambda 1)."""
    out = np.zeros((views, M), np.float32)
    out[:, 2] = 1.0
    return out


def draw_mixes(row: int, first: int, candidates: Sequence[int], sizes: dict[int, tuple[int, int]], views: int,
               settings: MixSettings, policy: str, seed: int) -> np.ndarray:
    """[V, M] mix records of `row` (whose shard starts at row `first`). `candidates`: the shard's rows that may
    be partners (their images decode), in row order; `sizes`: their (width, height)."""
    out = unmixed(views)
    others = [c for c in candidates if c != row]
    if not settings.on or not others:
        return out
    draw = POLICIES.get(policy)
    for v in range(1, views):
        rng = np.random.default_rng([seed, row, v, _MIX_STREAM])
        if rng.random() >= settings.prob:
            continue
        mode = settings.mode if settings.mode != "both" else ("mixup" if rng.random() < 0.5 else "cutmix")
        partner = others[int(rng.integers(len(others)))]
        lam = float(rng.beta(settings.alpha, settings.alpha))
        box = [0.0, 0.0, 0.0, 0.0]
        if mode == "cutmix":
            cut = math.sqrt(1.0 - lam)
            cx, cy = rng.random(), rng.random()
            box = [min(max(cx - cut / 2, 0.0), 1.0), min(max(cy - cut / 2, 0.0), 1.0),
                   min(max(cx + cut / 2, 0.0), 1.0), min(max(cy + cut / 2, 0.0), 1.0)]
            lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1])
        w, h = sizes[partner]
        partner_view = draw(rng, w, h, **POLICY_DEFAULTS[policy])
        out[v, :7] = [MIXUP if mode == "mixup" else CUTMIX, partner - first, lam, *box]
        out[v, _VIEW] = partner_view
    return out


def is_mixed(record) -> bool:
    return int(record[0]) != NONE


def mixed_views(records: np.ndarray) -> np.ndarray:
    """True where a record [..., M] (e.g. the `mix` array of some rows, [n, V, M]) names a mixed view."""
    return np.asarray(records)[..., 0] != NONE


def partner_row(record, first: int) -> int:
    return first + int(record[1])


def partner_view(record) -> np.ndarray:
    return np.asarray(record[_VIEW], np.float32)


def lam_of(record) -> float:
    """The weight of the row's own image (and label): 1 for a view that is not mixed."""
    return float(record[2]) if is_mixed(record) else 1.0


def pixel_box(record, size: int) -> tuple[int, int, int, int]:
    """The cutmix box at an output size: (x0, y0, x1, y1) in pixels, the relative coordinates rounded."""
    x0, y0, x1, y1 = (float(v) for v in record[_BOX])
    return int(round(x0 * size)), int(round(y0 * size)), int(round(x1 * size)), int(round(y1 * size))


def mix_pixels(own: torch.Tensor, partner: torch.Tensor, record) -> torch.Tensor:
    """A mixed view from the row's own uint8 [3, S, S] view and the partner's (the same size)."""
    kind = int(record[0])
    if kind == MIXUP:
        lam = float(np.float32(record[2]))
        blend = own.to(torch.float32) * lam + partner.to(torch.float32) * (1.0 - lam)
        return blend.round_().clamp_(0, 255).to(torch.uint8)
    if kind == CUTMIX:
        x0, y0, x1, y1 = pixel_box(record, own.shape[-1])
        out = own.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    return own


def describe(record) -> str:
    """One line for a picture: the kind and lambda (and the box of a cutmix)."""
    kind = int(record[0])
    if kind == MIXUP:
        return f"mixup λ={float(record[2]):.2f}"
    if kind == CUTMIX:
        x0, y0, x1, y1 = (float(v) for v in record[_BOX])
        return f"cutmix λ={float(record[2]):.2f} box=({x0:.2f},{y0:.2f},{x1:.2f},{y1:.2f})"
    return "not mixed"
