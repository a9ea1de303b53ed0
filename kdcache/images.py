"""Decode any image file once into bounded RGB bytes, or say why it cannot be used.

Both stages decode the packed bytes with `decode_packed`, so the pixels they see are identical.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# The most bytes an original file may have: an 8-bit RGB image at Pillow's decompression-bomb pixel limit
# (Image.MAX_IMAGE_PIXELS, 89.5 Mpx, which decode_original refuses) is 256 MiB stored raw, so no image this
# tool can decode needs a larger file (short of raw 16-bit or alpha data). A larger file is a bad row, not read.
MAX_FILE_BYTES = 256 * 2**20
# PNG for small images keeps them lossless; larger ones become JPEG once, at a fixed quality.
PNG_MAX_SIDE = 64
JPEG_QUALITY = 92


class BadImage(Exception):
    """The input cannot be turned into an RGB image; str(exc) is the reason recorded in the cache."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        else:
            # 16-bit data: keep the top 8 bits, as a viewer would
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode != "RGB":
        return img.convert("RGB")
    return img


def decode_original(data: bytes, bound: int) -> Image.Image:
    """Decode an original file into an RGB image whose longer side is at most `bound`."""
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG":
                img.draft("RGB", (bound, bound))  # let libjpeg downscale huge photos while decoding
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage(f"degenerate size {w}x{h}")
    if max(w, h) > bound:
        scale = bound / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def encode_packed(img: Image.Image) -> tuple[str, bytes]:
    """Encode once for the tar shard; returns (extension, bytes)."""
    buf = io.BytesIO()
    if max(img.size) <= PNG_MAX_SIDE:
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def _open_packed(data: bytes, max_side: int | None):
    """(kind, an opened Pillow image) of a packed member, its header checked: a PNG or JPEG whose format
    matches its signature and whose longer side is within `max_side`; BadImage otherwise."""
    if data[:8] == PNG_SIGNATURE:
        kind = "PNG"
    elif data[:3] == JPEG_SIGNATURE:
        kind = "JPEG"
    else:
        raise BadImage("packed member is neither PNG nor JPEG")
    img = None
    try:
        with warnings.catch_warnings():  # the size is checked below, against the much smaller bound
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if img.format != kind:
            raise BadImage(f"packed member claims {kind} but reads as {img.format}")
        if w < 1 or h < 1 or (max_side is not None and max(w, h) > max_side):
            raise BadImage(f"packed image is {w}x{h}, larger than the cache's image bound {max_side}")
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError ... on damage
        if img is not None:
            img.close()
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"packed {kind} does not decode ({type(e).__name__}: {e})") from None
    return kind, img


def packed_header(data: bytes, max_side: int | None = None) -> tuple[str, int, int]:
    """(kind, width, height) of a packed member from its header alone, refused as `decode_packed` refuses it;
    what the teacher pass needs before a JPEG is decoded elsewhere (on the teacher's device)."""
    kind, img = _open_packed(data, max_side)
    with img:
        return (kind, *img.size)


def decode_packed(data: bytes, max_side: int | None = None) -> torch.Tensor:
    """Packed bytes -> uint8 tensor [3, H, W]; the one decoder both stages use.

    The header is read first: anything but a PNG or JPEG, or an image whose longer side exceeds
    `max_side` (the cache's --image-bound: no packed image is larger), is refused before a pixel is
    decoded. PNG (lossless, so every decoder gives the same pixels) is decoded by Pillow, which
    reports damage as an exception; JPEG by torchvision. Damage is raised as BadImage, never a crash.
    """
    kind, img = _open_packed(data, max_side)
    with img:
        w, h = img.size
        if kind == "PNG":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    img.load()
                    rgb = img if img.mode == "RGB" else img.convert("RGB")
                    arr = np.asarray(rgb, dtype=np.uint8)
            except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError ... on damage
                raise BadImage(f"packed {kind} does not decode ({type(e).__name__}: {e})") from None
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise BadImage(f"packed JPEG does not decode ({e})") from None
    if tuple(img.shape[1:]) != (h, w):
        raise BadImage(f"packed JPEG decodes to {tuple(img.shape[1:])}, its header says {h}x{w}")
    return img
