"""The run folder: its name (time, method, student, config hash), the lock that keeps it to one run, the
check that a --resume continues the same run, and what each epoch leaves in it (metrics, checkpoint)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from kdcache import dist
from kdcache.report import metrics_csv
from kdcache.options import ConfigError, to_dict, write_yaml
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.run_files import remove_leftovers, writing

from .engine import append_metrics, load_checkpoint, publish, restore, save_checkpoint, truncate_metrics

# options that may differ when a run is resumed
RESUMABLE_CHANGES = {"resume", "epochs", "workers", "progress", "device", "tensorboard"}
# options added after runs were first saved, at the value every earlier run had: a config that leaves them at
# that value names and resumes runs exactly as before
DEFAULTS_ADDED_LATER = {"decay_norm_bias": True}
LOCK_FILES = {".lock", ".lock.owner"}


def config_hash(cfg, store: CacheStore) -> str:
    """8 hex digits naming what a run computes: its settings (those a resume may change left out) and
    the cache's fingerprint."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES | {"out"}
                and not (k in DEFAULTS_ADDED_LATER and v == DEFAULTS_ADDED_LATER[k])}
    text = json.dumps(settings, sort_keys=True, default=str) + store.fingerprint()
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(cfg, store: CacheStore) -> str:
    """runs/<UTC time>-<method>-<student>-<config hash>: two runs never share a folder by default."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg.method}-{cfg.student.replace('/', '-')}-{config_hash(cfg, store)}"


def default_out(cfg, store: CacheStore, runs: Path = Path("runs")) -> Path:
    """A new run folder; with --resume, the newest folder of a run with these settings on this cache."""
    if not cfg.resume:
        return runs / run_name(cfg, store)
    pattern = f"*-{cfg.method}-{cfg.student.replace('/', '-')}-{config_hash(cfg, store)}"
    found = sorted(p for p in runs.glob(pattern) if p.is_dir())
    if not found:
        raise CacheError(f"--resume: no run in {runs}/ has these settings on this cache ({pattern}); pass the run "
                         "folder printed when it started as --out")
    return found[-1]


def shared_default_out(cfg, store: CacheStore, rank: int) -> Path:
    """Rank 0 names the run folder (its clock), every rank gets the same name (or the same error)."""
    found, error = None, None
    if rank == 0:
        try:
            found = str(default_out(cfg, store))
        except CacheError as e:
            error = str(e)
    found, error = dist.broadcast((found, error))
    if error:
        raise CacheError(error)
    return Path(found)


def lock_run_dir(out: Path):
    """Hold an exclusive lock on the run folder for the whole run (released by the OS if the process dies);
    a second run on the same folder fails at once, naming the first."""
    import socket

    import filelock

    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / ".lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = (out / ".lock.owner").read_text().strip()
        except OSError:
            holder = ""
        raise CacheError(f"run folder {out} is in use by {holder or 'another process'}; wait for it to finish, "
                         "or pass another --out") from None
    (out / ".lock.owner").write_text(f"distill pid {os.getpid()} on {socket.gethostname()}, started "
                                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    return lock


def training_holder(out: Path) -> str | None:
    """Who holds the run folder's lock now (a distill still training it: its .lock.owner line), or None."""
    import filelock

    if not (out / ".lock").is_file():
        return None
    lock = filelock.FileLock(str(out / ".lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            return (out / ".lock.owner").read_text().strip() or "another process"
        except OSError:
            return "another process"
    lock.release()
    return None


def unlock_run_dir(out: Path, lock) -> None:
    """Release the run folder; a folder in which nothing was started is removed (no empty run left)."""
    started = {f.name for f in out.iterdir()} - LOCK_FILES
    if not started:
        (out / ".lock.owner").unlink(missing_ok=True)
    lock.release()
    if not started:
        (out / ".lock").unlink(missing_ok=True)
        out.rmdir()


def _resume_problem(out: Path, cfg, state: dict, fingerprint: str) -> str | None:
    """Why the checkpoint `state` cannot be continued by `cfg` (another cache, another config), or None."""
    if state.get("cache_fingerprint", fingerprint) != fingerprint:
        return (f"--resume: the cache at {cfg.cache} is not the one run {out} started from (fingerprint "
                f"{state['cache_fingerprint'][:12]}, now {fingerprint[:12]}); resume with the original "
                "cache, or start a new run with another --out")
    saved = dict(DEFAULTS_ADDED_LATER, **state["config"])  # a run saved before an option existed had its default
    now = to_dict(cfg)
    # the run folder may have moved, and the cache be named by another path: the fingerprint above binds the cache
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in RESUMABLE_CHANGES | {"out", "cache"} and saved.get(k) != now.get(k))
    if {"interleave", "clean_share"} & set(changed) and "interleave" not in saved:
        return (f"--resume: run {out} was trained on the stream made before batches were mixed across shards "
                "(--interleave) and view 0 had its own share (--clean-share); its next epochs cannot be those of the "
                "run it began, so it does not resume: start a new run with another --out")
    if changed:
        names = _option_names(cfg)
        differences = "; ".join(f"{names.get(k, k)} was {_shown(saved.get(k))}, now {_shown(now.get(k))}"
                                for k in changed)
        return f"--resume with another config: {differences}; use the original flags or a new --out"
    return None


def _option_names(cfg) -> dict[str, str]:
    """field -> how a message names it: its flag, or for a switch that a --no- flag turns off, its own name."""
    import dataclasses

    from kdcache.options import flag_name, meta

    return {f.name: f.name.replace("_", "-") if meta(f).negate else flag_name(f) for f in dataclasses.fields(cfg)}


def _shown(value) -> str:
    """A saved option's value as a message shows it: none for unset, on/off, KEY=VALUE pairs, names."""
    if value is None or value == [] or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v[0]}={v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def prepare_run_dir(out: Path, cfg, rank: int, module, optimizer, scheduler, fingerprint: str, ema=None) -> int:
    """Create the run folder, or restore the last intact checkpoint with --resume; returns the first epoch."""
    if rank == 0:
        remove_leftovers(out)  # of a write that was interrupted (a kill, a full disk)
    found = load_checkpoint(out) if (out / "checkpoints").is_dir() else None
    if found is None:
        if cfg.resume and rank == 0:
            print(f"--resume: no checkpoint in {out}, starting from epoch 1", file=sys.stderr)
        if rank == 0:
            if (out / "metrics.jsonl").exists() and not cfg.resume:
                raise CacheError(f"run folder {out} already has results; continue it with the same command plus "
                                 f"--resume --out {shlex.quote(str(out))}, or choose another --out")
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            with writing(out / "config.yaml", out):
                write_yaml(cfg, out / "config.yaml")
        return 0
    path, state = found
    if not cfg.resume:
        raise CacheError(f"run folder {out} has a checkpoint ({path.name}); continue it with the same command plus "
                         f"--resume --out {shlex.quote(str(out))}, or "
                         "choose another --out")
    problem = _resume_problem(out, cfg, state, fingerprint)
    if problem:
        raise CacheError(problem)
    done = state["epoch"] + 1
    if cfg.epochs < done:  # checked before anything in the run folder changes
        raise ConfigError(f"--epochs {cfg.epochs}: run {out} has already trained {done} epochs; resume it with "
                          f"--epochs {done} or more, or start a new run with another --out")
    if (ema is not None) != ("ema_updates" in state):  # a config check above compares --ema itself
        raise CacheError(f"run folder {out}: its checkpoint {path.name} {'has no' if ema is not None else 'has an'} "
                         "averaged student; resume it with the --ema it was started with")
    restore(path, module.student, module.method, ema, state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if rank == 0:
        truncate_metrics(out / "metrics.jsonl", state["epoch"])
        with writing(out / "config.yaml", out):
            write_yaml(cfg, out / "config.yaml")
        publish(out, path)  # the run's artifacts are the checkpoint's
    return state["epoch"] + 1


def save_epoch(out: Path, cfg, epoch: int, record: dict, student, method, state: dict, tensorboard=None,
               ema=None) -> None:
    """One epoch's metrics (jsonl, csv, tensorboard) and then its checkpoint; with progress on, one line."""
    # metrics first: a kill between the two leaves a record that --resume drops and redoes
    with writing(out / "metrics.jsonl", out):
        append_metrics(out / "metrics.jsonl", record)
    with writing(out / "metrics.csv", out):
        metrics_csv(out)
    if tensorboard is not None:
        with writing(out / "tensorboard", out):
            tensorboard.log(record)
    save_checkpoint(out, epoch, student, method, state, ema)
    if cfg.progress:
        ev = record.get("eval", {})
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record.get('loss', float('nan')):.4f} "
              f"{record['img_per_s']:.0f} img/s" + (f", top-1 {ev['top1']:.4f}" if ev else ""), file=sys.stderr)
