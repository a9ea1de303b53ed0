"""The bad-image zoo: each input is decoded correctly or marked bad with a reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kdcache.images import BadImage, decode_original, decode_packed, encode_packed


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, colour=(200, 40, 10)):
    return Image.new("RGB", (w, h), colour)


def zoo() -> dict[str, bytes]:
    """name -> file bytes; the names ending in '_bad' must be refused."""
    good_jpeg = _save(_rgb(), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    pal = Image.new("P", (20, 20))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 10, 20))
    pal.info["transparency"] = 0
    arr16 = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)
    return {
        "jpeg": good_jpeg,
        "empty_bad": b"",
        "truncated_bad": good_jpeg[: len(good_jpeg) // 2],
        "text_bad": b"this is not an image at all\n" * 10,
        "cmyk": _save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
        "gray16": _save(Image.fromarray(arr16), "PNG"),
        "palette_alpha": _save(pal, "PNG"),
        "rgba": _save(Image.new("RGBA", (16, 16), (0, 0, 255, 0)), "PNG"),
        "exif_rotated": _save(_rgb(40, 20), "JPEG", exif=exif.tobytes()),
        "one_pixel": _save(_rgb(1, 1), "PNG"),
        "extreme_aspect": _save(_rgb(2000, 3), "PNG"),
        "gif": _save(_rgb().convert("P"), "GIF"),
    }


@pytest.mark.parametrize("name", sorted(zoo()))
def test_zoo_member_decodes_or_is_refused(name):
    data = zoo()[name]
    if name.endswith("_bad"):
        with pytest.raises(BadImage) as e:
            decode_original(data, bound=64)
        assert str(e.value)  # the reason is recorded in the cache
        return
    img = decode_original(data, bound=64)
    assert img.mode == "RGB" and max(img.size) <= 64 and min(img.size) >= 1
    # what is packed decodes to the same pixels both stages will see
    ext, packed = encode_packed(img)
    t = decode_packed(packed)
    assert t.shape == (3, img.size[1], img.size[0])
    if ext == "png":
        assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(img))


def test_specific_conversions():
    z = zoo()
    assert decode_original(z["exif_rotated"], 64).size == (20, 40)  # rotated upright
    cmyk = np.asarray(decode_original(z["cmyk"], 64)).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK (0,255,255,0) is red
    gray16 = np.asarray(decode_original(z["gray16"], 64))
    assert gray16.min() < 10 and 200 < gray16.max() <= 255 and len(np.unique(gray16)) > 50  # not clipped
    pal = np.asarray(decode_original(z["palette_alpha"], 64))
    assert (pal[:, :10] == [255, 0, 0]).all() and (pal[:, 10:] == 255).all()  # transparent -> white
    assert decode_original(z["extreme_aspect"], 64).size == (64, 1)
