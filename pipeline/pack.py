"""Image folders -> webdataset tar shards aligned with cache shards.

Shard k holds rows k*S .. k*S+S-1, one member per row, in row order, named by the row index
(`000000123.jpg`); a row whose image is bad gets a `000000123.bad` member holding the reason, so
member i is always row i. Shards are written to a temporary name and renamed, so a shard file
that exists is complete.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

from .datasets import Dataset
from .images import BadImage, decode_original, encode_packed

PACKED_EXTENSIONS = ("jpg", "png", "bad")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same input packs to the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_shard(dataset: Dataset, rows: range, path: Path, bound: int) -> None:
    """Decode, bound and re-encode the rows of one shard into `path` (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in rows:
            try:
                img = decode_original(dataset.read_bytes(i), bound)
                ext, data = encode_packed(img)
            except BadImage as e:
                ext, data = "bad", str(e).encode()
            except OSError as e:  # unreadable file: permissions, vanished, I/O error
                ext, data = "bad", f"cannot read file: {e}".encode()
            _add_member(tar, f"{i:09d}.{ext}", data)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: Path) -> Iterator[tuple[int, str, bytes]]:
    """Yield (row, extension, bytes) in member order; refuses names that are not plain row ids."""
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if "/" in member.name or "\\" in member.name or not stem.isdigit() or ext not in PACKED_EXTENSIONS:
                raise ValueError(f"{path}: unexpected member {member.name!r}; re-pack this shard")
            f = tar.extractfile(member)
            yield int(stem), ext, f.read()
