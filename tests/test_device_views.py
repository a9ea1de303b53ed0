"""Views replayed in batches on the teacher's device (`kdcache.device_views`), run here on the CPU: the same
pixels as `views.apply` within the recorded tolerance, JPEG decoding in batches, and `--decode device`
extraction against the workers' cache."""
from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_all, run_cli
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdcache.device_views import axis_weights, colour_maps, crop_boxes, decode_batch, replay_views
from kdcache.images import BadImage, decode_packed, packed_header
from kdcache.cache.store import CacheStore
from kdcache.views import apply, list_policies, sample_views

EXAMPLES = 200 if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else 25
# The recorded tolerance of the batched replay against views.apply on the same decoded image: a pixel is
# rarely apart (a float32 sum in another order, rounded on the other side of .5), by one level, or by two
# where a colour gain above 1 (contrast, saturation) amplifies the rounding that views.apply makes between the
# resize and the jitter (measured on an AVX2 CPU: 3 of 400 generated cases, at most 2.2e-4 of their pixels).
MAX_LEVELS, MAX_FRACTION, MAX_FRACTION_TWO = 2, 1e-3, 5e-4


def _image(rng: np.random.Generator, h: int, w: int, smooth: bool) -> torch.Tensor:
    if smooth:  # a photo-like gradient with a little noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w, 1), yy * 255 / max(h, 1), (xx + yy) * 127 / max(h + w, 1)])
        return torch.from_numpy(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**16), views=st.integers(1, 4), out_size=st.sampled_from([16, 33, 64]),
       policy=st.sampled_from(list_policies()), interpolation=st.sampled_from(["bicubic", "bilinear", "nearest"]))
@example(seed=65535, views=2, out_size=33, policy="default", interpolation="bicubic")  # a pixel two levels apart
def test_batched_replay_equals_views_apply_within_a_level_or_rarely_two(seed, views, out_size, policy, interpolation):
    rng = np.random.default_rng(seed)
    images = [_image(rng, int(rng.integers(8, 120)), int(rng.integers(8, 120)), bool(k % 2)) for k in range(3)]
    params = np.stack([sample_views(seed + k, img.shape[2], img.shape[1], views, policy, seed, 0.875)
                       for k, img in enumerate(images)])
    colour = colour_maps(params.reshape(-1, params.shape[-1])).reshape(len(images), views, 3, 4)
    got = replay_views(images, torch.from_numpy(params), torch.from_numpy(colour), out_size, interpolation)
    want = torch.stack([apply(img, params[k, v], out_size, interpolation)
                        for k, img in enumerate(images) for v in range(views)])
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= MAX_LEVELS
    assert float((diff > 0).float().mean()) <= MAX_FRACTION
    assert float((diff > 1).float().mean()) <= MAX_FRACTION_TWO


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=st.integers(4, 90), w=st.integers(4, 90), out_size=st.integers(3, 70),
       interpolation=st.sampled_from(["bicubic", "bilinear"]), flip=st.booleans(), seed=st.integers(0, 999))
def test_axis_weights_are_torchs_antialiased_resize_of_the_crop(h, w, out_size, interpolation, flip, seed):
    """Before rounding: the two weight matrices give torch's float antialiased interpolation of the crop."""
    rng = np.random.default_rng(seed)
    img = torch.from_numpy(rng.random((3, h, w)).astype(np.float32) * 255)
    top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
    ch, cw = int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1))
    want = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(out_size, out_size), mode=interpolation,
                         align_corners=False, antialias=True)[0]
    if flip:
        want = want.flip(-1)
    wx = axis_weights(torch.tensor([left]), torch.tensor([cw]), w, out_size, interpolation, torch.tensor([flip]))[0]
    wy = axis_weights(torch.tensor([top]), torch.tensor([ch]), h, out_size, interpolation)[0]
    got = wy @ (img @ wx.T)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-5)


def test_crop_boxes_round_as_views_apply_does():
    # halves round to even (Python's round), and boxes stay inside the image with at least one pixel
    params = torch.tensor([[0.125, 0.5, 0.375, 1.0], [0.0, 0.0, 1.0, 1.0], [0.999, 0.999, 1.0, 1.0]])
    left, top, cw, ch = crop_boxes(params, torch.tensor([2, 9, 10]), torch.tensor([4, 7, 10]))
    assert left.tolist() == [0, 0, 9] and top.tolist() == [1, 0, 9]
    assert cw.tolist() == [1, 7, 1] and ch.tolist() == [1, 9, 1]


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_jpegs_decoded_in_one_batch_are_the_pixels_decode_packed_gives():
    rng = np.random.default_rng(3)
    good = [_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (77, 31), (96, 96))]
    gray = _jpeg(rng.integers(0, 256, (20, 24), dtype=np.uint8))  # a grayscale JPEG comes out RGB
    truncated = good[0][:len(good[0]) // 3]
    datas = good + [gray, truncated]
    sizes = [packed_header(d)[1:][::-1] for d in datas]
    got = decode_batch([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], sizes,
                       torch.device("cpu"))
    for k, d in enumerate(good + [gray]):
        assert torch.equal(got.images[k], decode_packed(d))
    with pytest.raises(BadImage) as err:
        decode_packed(truncated)
    assert got.images[4] is None and got.unreadable == {4: f"packed image does not decode: {err.value}"}


@pytest.mark.parametrize("data", [b"", b"GIF89a....", b"\xff\xd8\xffjunk", b"\x89PNG\r\n\x1a\nbroken"])
def test_packed_header_refuses_what_decode_packed_refuses(data):
    with pytest.raises(BadImage) as a:
        decode_packed(data, 64)
    with pytest.raises(BadImage) as b:
        packed_header(data, 64)
    def strip(e):  # Pillow names the file object by its address
        return re.sub(r" at 0x[0-9a-f]+", "", str(e.value))
    assert strip(a) == strip(b) and strip(a)


def test_packed_header_gives_the_decoded_size_and_enforces_the_bound():
    png = io.BytesIO()
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(png, format="PNG")
    jpeg = _jpeg(np.zeros((70, 30, 3), np.uint8))
    assert packed_header(png.getvalue()) == ("PNG", 9, 5) and decode_packed(png.getvalue()).shape == (3, 5, 9)
    assert packed_header(jpeg) == ("JPEG", 30, 70) and decode_packed(jpeg).shape == (3, 70, 30)
    with pytest.raises(BadImage, match="larger than the cache's image bound 64"):
        packed_header(jpeg, 64)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """JPEGs larger than the PNG bound (packed as JPEG), small PNG-packed ones, a file that is no image and a
    JPEG cut short after its header (it packs, then does not decode)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(9):
            h, w = (int(rng.integers(70, 200)), int(rng.integers(70, 200))) if i % 3 else (30, 40)
            (root / f"c{c}").mkdir(exist_ok=True)
            Image.fromarray(_image(rng, h, w, True).permute(1, 2, 0).numpy()).save(root / f"c{c}" / f"{i}.jpg")
    (root / "c0" / "x.jpg").write_bytes(b"not an image")
    return root


FOLDER = ["--teacher", "test_vit", "--random-init", "--no-progress", "--dataset", "imagefolder", "--views", "3",
          "--shard-size", "8", "--teacher-input-size", "48"]


def _extract(root, out, *extra):
    run_cli("extract", *FOLDER, "--data-root", str(root), "--batch-size", "7", "--workers", "0", "--out", str(out),
            *extra)
    return read_all(out)


def _extract_with_stats(root, out, **options):
    """The same extraction as `_extract`, through the stage's API: (arrays, the teacher pass's statistics)."""
    from kdcache.stages.extract import ExtractConfig, extract

    cfg = ExtractConfig(teacher="test_vit", random_init=True, progress=False, dataset="imagefolder", views=3,
                        shard_size=8, teacher_input_size=48, data_root=str(root), batch_size=7, out=str(out),
                        **{"workers": 0} | options)
    stats = extract(cfg).stats.as_dict()
    return read_all(out), stats


def test_device_decode_on_the_cpu_gives_the_workers_cache_within_the_tolerance(photo_folder, tmp_path):
    a, stats = _extract_with_stats(photo_folder, tmp_path / "workers")
    assert stats["replaying"] == 0
    b, stats = _extract_with_stats(photo_folder, tmp_path / "device", decode="device", workers=1)  # batches cross processes
    assert 0 < stats["starting"] <= stats["waited"] <= stats["seconds"]  # the pass's waits, timed
    assert 0 < stats["replaying"] < stats["seconds"] and stats["images"] == 19
    for name in ("views", "status", "reasons", "image_digests", "labels", "keys"):
        assert np.array_equal(a[name], b[name]), name
    assert (a["status"] == 2).sum() == 1  # the file that is no image, in both
    done = a["status"] == 1
    fa, fb = a["features"][done].astype(np.float32), b["features"][done].astype(np.float32)
    cos = (fa * fb).sum(-1) / np.linalg.norm(fa, axis=-1) / np.linalg.norm(fb, axis=-1)
    assert cos.min() > 0.999
    import zarr

    assert zarr.open_group(str(tmp_path / "device"), mode="r").attrs["views"]["decode"] == "device"
    assert "decode" not in zarr.open_group(str(tmp_path / "workers"), mode="r").attrs["views"]
    # a cache's views were made one way: resuming it the other way is refused by name
    proc = run_cli("extract", *FOLDER, "--data-root", str(photo_folder), "--out", str(tmp_path / "device"),
                   check=False)
    assert proc.returncode == 2 and "views.decode" in proc.stderr


def test_a_jpeg_that_fails_on_the_device_is_a_bad_row_with_its_reason(photo_folder, tmp_path, monkeypatch):
    import kdcache.device_views as dv

    real = dv.decode_batch

    def damaged_second(encoded, sizes, device, image_bound=None):
        if len(encoded) > 1:
            encoded = list(encoded)
            encoded[1] = encoded[1][:40]  # the header survives, the scan does not
        return real(encoded, sizes, device, image_bound)

    monkeypatch.setattr("kdcache.extraction.decode_batch", damaged_second)
    got = _extract(photo_folder, tmp_path / "c", "--decode", "device")
    reasons = CacheStore.open(tmp_path / "c").text("reasons")
    bad = np.flatnonzero(got["status"] == 2)
    assert len(bad) > 1 and sum("packed image does not decode" in reasons[r] for r in bad) == len(bad) - 1
    assert (got["features"][bad] == 0).all() and (got["features"][got["status"] == 1] != 0).any()


def test_an_unknown_decode_place_is_one_line_naming_the_flag(tmp_path):
    proc = run_cli("extract", *TINY, "--dataset-opt", "n=8", "--decode", "gpu", "--out", str(tmp_path / "c"),
                   check=False)
    assert proc.returncode == 2 and "--decode 'gpu'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()
