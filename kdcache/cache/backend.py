"""Where a cache lives: a local path, or any fsspec URL (s3://, gs://, az://, memory://, file://).

Local caches are `pathlib.Path`s; a URL becomes a `upath.UPath`, which has the same API over the
fsspec filesystem. Everything that differs between the two is a method of `Local` or `ObjectStore`
(`backend(path)` picks one); no other module asks which one a path is. What object storage lacks:
- no locks: inter-process locks (shard claims, creation, head fit, derived data) are local files; on
  object storage they are no-ops, so processes there split the work by torchrun ranks or `--part i/N`
  (job arrays), never by hand-started processes claiming shards;
- no rename: a file is written once, at its final name; an object appears only when its upload is
  complete, so a reader never sees half of it.
Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS environment
variables or files, and fsspec's `FSSPEC_S3_ENDPOINT_URL` for an S3-compatible server).
Imports nothing of kdcache.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path


class LocationError(ValueError):
    """A cache location that cannot be used: a URL without its filesystem's package, or without a bucket and a
    path, or a URL where only a local path will do (a user error: the message names the flag)."""


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = ("", "file", "local")


def _is_url(value) -> bool:
    return bool(URL.match(str(value)))


def _is_remote(path) -> bool:
    return getattr(path, "protocol", "") not in LOCAL_PROTOCOLS


def cache_path(value) -> Path:
    """A cache's location: a Path for a local path or file:// URL, a UPath for any other URL."""
    if isinstance(value, Path) and not _is_remote(value):
        return value
    text = str(value)
    if not _is_url(text):
        return Path(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    from upath import UPath

    try:
        return UPath(text)
    except (ValueError, ImportError) as e:  # an unknown protocol, or its filesystem package is missing
        raise LocationError(f"{e}; object storage needs its filesystem's package, e.g. `pip install kdcache[s3]` "
                         "for s3://") from None


def check_url(value: str | None, flag: str) -> bool:
    """True when `value` is a URL whose filesystem is installed (and names a bucket and a path); False when it
    is no URL; a LocationError naming `flag` otherwise."""
    if not value or not _is_url(value):
        return False
    try:
        path = cache_path(value)  # an unknown protocol fails here
        if _is_remote(path):
            path.fs  # a missing filesystem package fails here
    except (ValueError, ImportError) as e:
        raise LocationError(f"{flag} {value}: no filesystem for this URL is installed ({e})") from None
    if not str(value).split("://", 1)[1].strip("/"):
        raise LocationError(f"{flag} {value}: give a bucket and a path, e.g. s3://bucket/caches/name")
    return True


def refuse_url(value: str | None, message: str) -> None:
    """A LocationError(`message`) when `value` is a URL (for what lives on local or shared file systems only)."""
    if value and _is_url(value):
        raise LocationError(message)


def open_mode(value) -> str:
    """The Zarr mode to open a cache with: r+ where this process may write (always assumed on a URL)."""
    return "r+" if _is_url(value) or os.access(value, os.W_OK) else "r"


class _NoLock:
    """A lock that is always free (object storage has none)."""

    def acquire(self, timeout=None):
        return self

    def release(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Local:
    """A local (or shared, mounted) file system."""

    @staticmethod
    def lock(path, parents: bool = False):
        """An inter-process lock at `path` (a file, released by the OS if the holder dies)."""
        import filelock

        if parents:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(path))

    @staticmethod
    def put(path, data: bytes) -> None:
        """Write a whole file: a temporary beside it, synced, then renamed (a reader never sees half of it)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def reader(path):
        """A binary file object of `path`, as a context manager."""
        return open(path, "rb")

    @staticmethod
    def size(path) -> int:
        """Bytes of a file tree (0 when absent)."""
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0

    @staticmethod
    def writable(path) -> bool:
        return os.access(path, os.W_OK)

    @staticmethod
    def zarr_target(path):
        """Where Zarr creates a store at `path`: a symlinked folder keeps its link (what it points to is replaced)."""
        return path.resolve() if path.is_symlink() else path

    @staticmethod
    def remove_tree(path) -> None:
        """Remove a folder; a symlinked one keeps its link and loses its contents."""
        if path.is_symlink():
            for child in path.resolve().iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            return
        shutil.rmtree(path)

    @staticmethod
    def make_parent(path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def parents(path) -> list:
        """The folders above `path`, nearest first."""
        return list(path.parents)

    @staticmethod
    def temporaries(folder, pattern: str) -> list:
        return list(Path(folder).glob(pattern))


class ObjectStore:
    """An fsspec filesystem (S3, GCS, Azure, memory): no locks, no rename, whole-object puts."""

    @staticmethod
    def lock(path, parents: bool = False):
        return _NoLock()

    @staticmethod
    def put(path, data: bytes) -> None:
        path.write_bytes(data)  # an object appears only once its upload is complete

    @staticmethod
    def reader(path):
        return contextlib.nullcontext(io.BytesIO(path.read_bytes()))  # read whole: shards are small

    @staticmethod
    def size(path) -> int:
        try:
            return int(path.fs.du(path.path, total=True))
        except FileNotFoundError:
            return 0

    @staticmethod
    def writable(path) -> bool:
        return True  # as far as this process can tell: its credentials decide

    @staticmethod
    def zarr_target(path):
        return path

    @staticmethod
    def remove_tree(path) -> None:
        path.fs.rm(path.path, recursive=True)

    @staticmethod
    def make_parent(path) -> None:
        pass  # object storage has no folders

    @staticmethod
    def parents(path) -> list:
        return []

    @staticmethod
    def temporaries(folder, pattern: str) -> list:
        return []  # objects are uploaded whole: there are no temporaries


def backend(path) -> type[Local] | type[ObjectStore]:
    """The storage `path` (a Path or UPath, see cache_path) lives on."""
    return ObjectStore if _is_remote(path) else Local


def lock(path, parents: bool = False):
    """An inter-process lock at `path` (see the module docstring); `parents`: create its folder first."""
    return backend(path).lock(path, parents)


def chunk_path(root, name: str, arr, k: int):
    """The file of shard k of array `name` (a sharded array: one file per shard) in the store at `root`."""
    key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
    return root / name / key
