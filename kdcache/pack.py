"""Image folders -> tar shards (in webdataset's layout) aligned with cache shards.

Shard k holds rows k*S .. k*S+S-1, one member per row, in row order, named by the row index
(`000000123.jpg`); a row whose image is bad gets a `000000123.bad` member holding the reason, so
member i is always row i. Shards are written to a temporary name and renamed, so a shard file
that exists is complete. The cache records a digest of every member (`member_digest`, array
`image_digests`), so a reader can tell a damaged, swapped or renamed member from the packed one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .datasets import Dataset, FileTooLarge
from .images import MAX_FILE_BYTES, BadImage, decode_original, encode_packed
from .cache.backend import backend, cache_path
from .cache.format import CacheError

PACKED_EXTENSIONS = ("jpg", "png", "bad")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same input packs to the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_original(dataset: Dataset, i: int, limit: int | None = None) -> bytes:
    """Row i's original file, read only if it is at most `limit` bytes (default MAX_FILE_BYTES), and never more
    than that: a multi-gigabyte junk file is a bad row, not a multi-gigabyte read."""
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        data = dataset.read_bytes(i, limit=limit)
    except FileTooLarge as e:
        raise BadImage(f"file too large: {e.size:,} bytes, over the limit of {limit:,} bytes for an image file; "
                       "not read") from None
    if len(data) > limit:  # it grew after its size was checked, or it is a device
        raise BadImage(f"file too large: more than {limit:,} bytes, over the limit for an image file")
    return data


def pack_shard(dataset: Dataset, rows: range, path: Path, bound: int) -> None:
    """Decode, bound and re-encode the rows of one shard into `path` (atomically: a local file is written
    to a temporary name and renamed; an object is uploaded whole, and appears only when complete)."""
    path = cache_path(path)
    packed = io.BytesIO()  # a shard is small (bounded images); it is written out in one piece
    with tarfile.open(fileobj=packed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in rows:
            try:
                img = decode_original(read_original(dataset, i), bound)
                ext, data = encode_packed(img)
            except BadImage as e:
                ext, data = "bad", str(e).encode()
            except OSError as e:  # unreadable file: permissions, vanished, I/O error
                ext, data = "bad", f"cannot read file: {e}".encode()
            _add_member(tar, f"{i:09d}.{ext}", data)
    backend(path).put(path, packed.getvalue())


def member_digest(ext: str, data: bytes) -> bytes:
    """16-byte digest of one packed member (its extension included: a renamed member differs)."""
    return hashlib.blake2b(ext.encode() + b"\x00" + data, digest_size=16).digest()


def remove_stale_temporaries(images_dir: Path) -> int:
    """Delete half-written `.shard-*.tmp` files whose writer process is gone; returns how many."""
    removed = 0
    for tmp in backend(images_dir).temporaries(images_dir, ".shard-*.tar.*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-2])
            os.kill(pid, 0)
            continue  # its writer still runs
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def _open_tar(path):
    """A tar shard read as a stream, from a local file or an object (read whole: shards are small)."""
    path = cache_path(path)
    with backend(path).reader(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        yield tar


def read_members(path: Path, rows: range) -> tuple[dict[int, tuple[str, bytes]], list[str]]:
    """Every member of shard `path` that is a row of `rows`, as {row: (ext, bytes)}, and the problems
    found on the way (unexpected, duplicated or non-file members, a tar that ends early). Never raises
    for a damaged file: what could be read is returned and the rest is named in the problems."""
    found: dict[int, tuple[str, bytes]] = {}
    problems: list[str] = []
    try:
        with _open_tar(path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if not member.isfile() or "/" in member.name or "\\" in member.name or not stem.isdigit() \
                        or ext not in PACKED_EXTENSIONS or int(stem) not in rows:
                    problems.append(f"unexpected member {member.name!r}")
                    continue
                row = int(stem)
                if row in found:
                    problems.append(f"row {row} appears twice")
                    continue
                f = tar.extractfile(member)
                found[row] = (ext, f.read())
    except FileNotFoundError:
        problems.append("file is missing")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        problems.append(f"unreadable after {len(found)} member(s) ({type(e).__name__}: {e})")
    return found, problems


def read_shard(path: Path) -> Iterator[tuple[int, str, bytes]]:
    """Yield (row, extension, bytes) in member order; refuses names that are not plain row ids."""
    with _open_tar(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if "/" in member.name or "\\" in member.name or not stem.isdigit() or ext not in PACKED_EXTENSIONS:
                raise CacheError(f"{path}: unexpected member {member.name!r}; re-pack this shard")
            f = tar.extractfile(member)
            yield int(stem), ext, f.read()
