"""Real photographs as JPEG files at typical photo sizes, with no network: the benchmarks' image source.

The photos are the ones installed packages ship: scikit-image's data photos where scikit-image is installed
(files in its package, never its downloader), scikit-learn's two sample images and matplotlib's portrait.
Each file is a different crop of one of them, resized to a camera size (500x375 to 1024x768, landscape or
portrait) and saved as JPEG at quality 90, laid out as an imagefolder tree (root/c<k>/<i>.jpg).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768))
QUALITY = 90


def _skimage_photos() -> list[Path]:
    try:
        import skimage
    except ImportError:
        return []
    folder = Path(skimage.__file__).parent / "data"
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _other_photos() -> list[Path]:
    out = []
    try:
        import sklearn.datasets

        out += [Path(sklearn.datasets.__file__).parent / "images" / n for n in ("china.jpg", "flower.jpg")]
    except ImportError:
        pass
    try:
        import matplotlib

        out.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    return [p for p in out if p.is_file()]


def photo_sources(min_side: int = 256) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) colour photos of at least `min_side` pixels a side, from installed packages."""
    out = []
    for path in _skimage_photos() + _other_photos():
        try:
            with Image.open(path) as img:
                if img.mode not in ("RGB", "RGBA") or min(img.size) < min_side:
                    continue
                out.append((path.stem, np.asarray(img.convert("RGB"))))
        except OSError:
            continue
    if not out:
        raise RuntimeError("no photos found: install scikit-image, scikit-learn or matplotlib")
    return out


_SOURCES: list = []


def _load_sources() -> None:
    if not _SOURCES:
        _SOURCES.extend(img for _, img in photo_sources())


def _one_photo(args) -> None:
    path, index, seed = args
    _load_sources()
    source = _SOURCES[index % len(_SOURCES)]
    rng = np.random.default_rng(seed)
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    if rng.random() < 0.25:
        w, h = h, w  # portrait
    sh, sw = source.shape[:2]
    aspect = w / h
    side = rng.uniform(0.55, 1.0)  # a crop of the source at the target's aspect ratio
    cw = min(sw, sh * aspect) * side
    ch = cw / aspect
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = Image.fromarray(source).crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch)))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=QUALITY)


def make_photo_folder(root: Path, n: int, classes: int = 8, seed: int = 0, processes: int | None = None) -> Path:
    """`n` JPEG photos in an imagefolder tree under `root` (made once: an existing complete tree is kept)."""
    root = Path(root)
    paths = [root / f"c{i % classes}" / f"{i:06d}.jpg" for i in range(n)]
    if all(p.is_file() for p in paths):
        return root
    jobs = [(p, i, (seed, i)) for i, p in enumerate(paths)]
    workers = processes or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16)
    if workers > 1 and n > 64:
        with ProcessPoolExecutor(workers, initializer=_load_sources) as pool:
            list(pool.map(_one_photo, jobs, chunksize=16))
    else:
        for job in jobs:
            _one_photo(job)
    return root
