"""Writing the files a run hands to others (exports, reports, checkpoints): whole or not at all, and
readable by whoever the umask lets read them."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(*paths: str | os.PathLike) -> None:
    """Give files the mode a plain open() would (0644 under umask 022). Libraries that write through a
    private temporary file leave 0600 (safetensors' save_file), which other users cannot load."""
    mode = 0o666 & ~umask()
    for p in paths:
        os.chmod(p, mode)


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors' save_file, with the usual file mode (see `share`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    share(path)


def write_atomic(path: str | os.PathLike, data) -> None:
    """Write a file under a temporary name, then rename it: a reader sees the old file or the new one,
    never half of one, and an interrupted write leaves only a hidden temporary file. `data` is the text or
    bytes to write, or a function that writes the temporary path it is given."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a write that failed (a full disk) leaves nothing behind
        tmp.unlink(missing_ok=True)


def writable(folder: str | os.PathLike) -> bool:
    """Whether a file can be created in `folder` (tried, not guessed from the mode bits: root, read-only
    mounts and access lists answer differently)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
