"""Where a cache lives: a local path, or any fsspec URL (s3://, gs://, az://, memory://, file://).

Local caches are `pathlib.Path`s; a URL becomes a `upath.UPath`, which has the same API over the
fsspec filesystem, so the store, the packer and the readers use one code path. What object storage
lacks is said here once:
- no locks: inter-process locks (shard claims, creation, head fit, derived data) are local files; on
  object storage they are no-ops, so processes there split the work by torchrun ranks or `--part i/N`
  (job arrays), never by hand-started processes claiming shards;
- no rename: a file is written once, at its final name; an object appears only when its upload is
  complete, so a reader never sees half of it.
Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS environment
variables or files, and fsspec's `FSSPEC_S3_ENDPOINT_URL` for an S3-compatible server).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = ("", "file", "local")


def is_url(value) -> bool:
    return bool(URL.match(str(value)))


def cache_path(value) -> Path:
    """A cache's location: a Path for a local path or file:// URL, a UPath for any other URL."""
    if isinstance(value, Path) and not is_remote(value):
        return value
    text = str(value)
    if not is_url(text):
        return Path(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    from upath import UPath

    try:
        return UPath(text)
    except (ValueError, ImportError) as e:  # an unknown protocol, or its filesystem package is missing
        raise ValueError(f"{e}; object storage needs its filesystem's package, e.g. `pip install kdcache[s3]` "
                         "for s3://") from None


def is_remote(path) -> bool:
    """True for a location on object storage (no locks, no rename)."""
    return getattr(path, "protocol", "") not in LOCAL_PROTOCOLS


def file_lock(path) -> contextlib.AbstractContextManager:
    """An inter-process lock at `path` (a local file, released by the OS if the holder dies); on object
    storage a no-op (see the module docstring)."""
    if is_remote(path):
        return contextlib.nullcontext()
    import filelock

    return filelock.FileLock(str(path))
