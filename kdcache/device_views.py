"""Views replayed in batches on the teacher's device: JPEG decoding and `views.apply` for many views at once.

`views.apply` replays one view of one decoded image (crop, antialiased resize, flip, colour map). Here a
whole batch of views is replayed with a fixed number of tensor operations, on a GPU or on the CPU:

- the packed JPEGs of a batch are decoded together (`torchvision.io.decode_jpeg`; nvJPEG on a GPU);
- a view's crop, resize and flip are one weight matrix per axis, so the resize of every view of the
  batch is two batched matrix products (the width first, then the height, as torch's separable
  antialiased kernel runs them), with the weights computed as that kernel computes them;
- the colour jitter is one batched affine map (`views.colour_matrix` for each view).

The arithmetic is torchvision's float32 path (`apply` casts the crop to float32, resizes, clamps and rounds
once), in another order of summation: a pixel whose float32 value lands within rounding of .5 can come out
one level apart, and rarely two where a colour gain above 1 amplifies the rounding `apply` makes between
the resize and the jitter. On the CPU the decoded pixels are the ones `decode_packed` gives; nvJPEG's may differ
slightly. `tests/test_device_views.py` bounds both differences on the CPU; `benchmarks/bench.py --gpu`
measures them on a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .images import BadImage, decode_packed
from .views import _LUMA, colour_matrix

HALF_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # interp_size / 2 of torch's antialiased kernels
CUBIC_A = -0.5  # torch's antialiased bicubic filter uses Keys' a = -0.5


def colour_maps(params: np.ndarray) -> np.ndarray:
    """[N, P] view parameters -> [N, 3, 4]: each view's colour matrix M and its offset per unit of mean luma
    (the offset is linear in the crop's mean luma, which only the device knows)."""
    out = np.zeros((len(params), 3, 4), np.float64)
    for i, p in enumerate(np.asarray(params, np.float64)):
        m, t = colour_matrix(p[5], p[6], p[7], p[8], p[9] >= 0.5, 1.0)
        out[i, :, :3], out[i, :, 3] = m, t
    return out


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp_min(0)
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def axis_weights(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int, interpolation: str,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """[N, size_out, size_in] float32: resize source pixels [start, start + length) of each view to size_out
    along one axis (columns reversed where `flip`), as torch's antialiased (or legacy nearest) kernel weighs
    them; pixels outside the crop weigh zero."""
    dev = start.device
    out_idx = torch.arange(size_out, device=dev, dtype=torch.float32)
    src = torch.arange(size_in, device=dev)[None, None, :] - start[:, None, None]  # crop coordinate
    length_f = length.to(torch.float32)
    if interpolation == "nearest":
        scale = length_f / size_out
        nearest = torch.minimum((out_idx[None, :] * scale[:, None]).floor().long(), length[:, None] - 1)
        w = (src == nearest[..., None]).to(torch.float32)
    else:
        half = HALF_SUPPORT[interpolation]
        scale = length_f / size_out
        wide = scale >= 1.0
        support = torch.where(wide, half * scale, torch.full_like(scale, half))[:, None, None]
        invscale = torch.where(wide, 1.0 / scale, torch.ones_like(scale))[:, None, None]
        center = (scale[:, None] * (out_idx[None, :] + 0.5))[..., None]  # N, out, 1
        lo = (center - support + 0.5).trunc().clamp_min(0)
        hi = torch.minimum((center + support + 0.5).trunc(), length_f[:, None, None])
        w = _filter((src - center + 0.5) * invscale, interpolation)
        w = torch.where((src >= lo) & (src < hi), w, torch.zeros_like(w))
        total = w.sum(-1, keepdim=True)
        w = w / torch.where(total != 0, total, torch.ones_like(total))
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def crop_boxes(params: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(left, top, width, height) in pixels of each view's box, rounded and clipped as `views.apply` does."""
    p = params.to(torch.float64)
    w, h = widths.to(torch.float64), heights.to(torch.float64)
    left = torch.minimum(torch.round(p[:, 0] * w), w - 1)
    top = torch.minimum(torch.round(p[:, 1] * h), h - 1)
    crop_w = torch.minimum(torch.round((p[:, 2] - p[:, 0]) * w), w - left).clamp_min(1)
    crop_h = torch.minimum(torch.round((p[:, 3] - p[:, 1]) * h), h - top).clamp_min(1)
    return left.long(), top.long(), crop_w.long(), crop_h.long()


@contextlib.contextmanager
def _full_float32():
    """Matrix products in full float32 (no TF32 on a GPU): the replay must not depend on a global setting."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of different sizes -> one float32 [B, 3, Hmax, Wmax] tensor, zero beyond each image."""
    hm, wm = max(int(i.shape[1]) for i in images), max(int(i.shape[2]) for i in images)
    canvas = torch.zeros(len(images), 3, hm, wm, dtype=torch.float32, device=images[0].device)
    for k, img in enumerate(images):
        canvas[k, :, :img.shape[1], :img.shape[2]] = img
    return canvas


def replay_views(images: list[torch.Tensor], params: torch.Tensor, colour: torch.Tensor, out_size: int,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Replay V views of each of B decoded images: uint8 [3, h, w] images on one device, `params` [B, V, P]
    and `colour` [B, V, 3, 4] (`colour_maps`) -> uint8 [B * V, 3, out_size, out_size], in (image, view) order."""
    b, v = params.shape[:2]
    dev = images[0].device
    s = out_size
    canvas = pad_images(images)
    hm, wm = canvas.shape[2:]
    heights = torch.tensor([int(i.shape[1]) for i in images], device=dev).repeat_interleave(v)
    widths = torch.tensor([int(i.shape[2]) for i in images], device=dev).repeat_interleave(v)
    flat = params.reshape(b * v, -1).to(dev)
    left, top, crop_w, crop_h = crop_boxes(flat, heights, widths)
    wx = axis_weights(left, crop_w, wm, s, interpolation, flip=flat[:, 4] >= 0.5)  # BV, S, Wm
    wy = axis_weights(top, crop_h, hm, s, interpolation)  # BV, S, Hm
    with _full_float32():
        # width pass: every view of an image in one product, [B, 3*Hm, Wm] @ [B, Wm, V*S]
        across = torch.bmm(canvas.reshape(b, 3 * hm, wm), wx.reshape(b, v * s, wm).transpose(1, 2))
        across = across.reshape(b, 3, hm, v, s).permute(0, 3, 2, 1, 4).reshape(b * v, hm, 3 * s)
        # height pass: [BV, S, Hm] @ [BV, Hm, 3*S]
        out = torch.bmm(wy, across).reshape(b * v, s, 3, s).permute(0, 2, 1, 3)
    if interpolation == "bicubic":
        out = out.clamp(0, 255)
    x = out.round().reshape(b * v, 3, s * s)
    return _colour(x, colour.reshape(b * v, 3, 4).to(dev)).reshape(b * v, 3, s, s)


_LUMA_F32 = torch.from_numpy(_LUMA).to(torch.float32)


def _colour(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """[N, 3, HW] float32 pixels (whole numbers) -> uint8 after each view's affine colour map."""
    mean_luma = (x.mean(dim=2) @ _LUMA_F32.to(x.device)).to(torch.float64)  # N
    offset = (colour[:, :, 3].to(torch.float64) * mean_luma[:, None]).to(torch.float32)
    with _full_float32():
        y = torch.baddbmm(offset[:, :, None], colour[:, :, :3].to(torch.float32), x)
    return y.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class Decoded:
    images: list  # uint8 [3, h, w] on the device, or None where the image does not decode
    unreadable: dict  # index in the batch -> reason, for images that do not decode


def decode_batch(encoded: list[torch.Tensor], sizes: list[tuple[int, int]], device: torch.device,
                 image_bound: int | None = None) -> Decoded:
    """Decode packed JPEGs (uint8 1-D tensors on the host, their (h, w) from the header) on `device` in one
    call; an image the batched call cannot decode, or that decodes to another size, is decoded alone,
    and then by `decode_packed` on the host, which names the damage (BadImage)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def one(k: int):
        try:
            img = decode_jpeg(encoded[k], mode=ImageReadMode.RGB, device=device)
            if tuple(img.shape[1:]) == sizes[k]:
                return img
        except RuntimeError:
            pass
        return decode_packed(bytes(encoded[k].numpy()), image_bound).to(device)  # raises BadImage

    if not encoded:
        return Decoded([], {})
    try:
        got = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        got = [None] * len(encoded)
    images, unreadable = list(got), {}
    for k, img in enumerate(got):
        if img is None or tuple(img.shape[1:]) != sizes[k]:
            try:
                images[k] = one(k)
            except BadImage as e:
                images[k], unreadable[k] = None, f"packed image does not decode: {e}"
    return Decoded(images, unreadable)
