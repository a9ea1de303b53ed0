"""Reading and writing a run's own files (checkpoints, the student, metrics.jsonl) so that a damaged file is
named as damaged, with what to do, and a full disk is one line that says how to continue, never a library's
traceback."""
from __future__ import annotations

import contextlib
import errno
import json
import shlex
from pathlib import Path

from kdcache.cache.format import CacheError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# what safetensors and torch say instead of raising an OSError when the disk fills
NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# what a checkpoint's state.pt holds (fingerprint and later options may be absent from older runs)
STATE_KEYS = ("epoch", "config", "optimizer", "scheduler", "rng")
# the files of a run folder that distill writes under a temporary name, then renames
RUN_WRITES = ("config.yaml", "metrics.jsonl", "metrics.csv", "student.safetensors", "method.safetensors",
              "summary.json")


class RunFileError(CacheError):
    """A file of a run folder is damaged, or could not be written."""


def damaged(path: Path, what: str, todo: str) -> RunFileError:
    return RunFileError(f"{path} is damaged ({what})" + (f": {todo}" if todo else ""))


def _what(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(". ")[0]  # torch's reader adds advice about its own bugs
    return text if len(text) <= 160 else text[:157] + "..."


def resume_hint(run_dir: Path) -> str:
    """The command that continues a run whose config.yaml is intact (a run's config.yaml serves as --config)."""
    q = shlex.quote(str(run_dir))
    return f"python cli.py distill --config {shlex.quote(str(run_dir / 'config.yaml'))} --resume --out {q}"


def read_tensors(path: Path, todo: str) -> dict:
    """A safetensors file, or the error naming it as damaged (truncated, not safetensors)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise damaged(path, "it is missing", todo) from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error types differ between versions
        raise damaged(path, _what(e), todo) from None


def read_state(path: Path, todo: str) -> dict:
    """A checkpoint's state.pt, or the error naming it as damaged (truncated, not a checkpoint's state)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise damaged(path, "it is missing", todo) from None
    except Exception as e:  # noqa: BLE001 - torch's zip reader and unpickler raise many kinds
        raise damaged(path, _what(e), todo) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise damaged(path, f"it lacks {', '.join(missing)}", todo)
    return state


def metric_lines(path: Path, todo: str, last_may_be_cut: bool = False) -> list[tuple[str, dict]]:
    """(line, record) of each epoch's record in metrics.jsonl (one JSON object a line). With `last_may_be_cut`,
    a last line cut short (a kill during the append) is dropped; any other line that is not a record names the
    file as damaged."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch", 0), int):
            out.append((line, record))
        elif not (last_may_be_cut and i == len(lines) - 1):
            raise damaged(path, f"line {i + 1} is not an epoch's record", todo)
    return out


def read_metrics(path: Path, todo: str, last_may_be_cut: bool = False) -> list[dict]:
    """The records of metrics.jsonl (`metric_lines`)."""
    return [record for _, record in metric_lines(path, todo, last_may_be_cut)]


def is_no_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    return any(w in str(e) for w in NO_SPACE_WORDS)


@contextlib.contextmanager
def writing(path: Path, run_dir: Path):
    """Writes to `path` inside: a full disk (ENOSPC, a full quota) becomes one line naming the file and how
    to continue the run; any other error passes through."""
    try:
        yield
    except Exception as e:
        if not is_no_space(e):
            raise
        raise RunFileError(f"no space left on device writing {path}: free space and run the same command again "
                           f"with --resume --out {shlex.quote(str(run_dir))} to continue the run") from None


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files an interrupted write left in a run folder (a checkpoint being built, a file
    written under a temporary name): the run folder is locked to this run, so none is being written."""
    import shutil

    found = [p for p in (run_dir / "checkpoints").glob(".*.tmp")] if (run_dir / "checkpoints").is_dir() else []
    found += [p for name in RUN_WRITES for p in run_dir.glob(f".{name}.*.tmp")]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def epochs_recorded(run_dir: Path) -> int:
    """Epochs the run recorded in metrics.jsonl (each line is one finished epoch)."""
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return 0
