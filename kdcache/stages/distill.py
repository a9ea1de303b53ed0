"""Stage two: train a student from the cache (CustomKD by default) under a label scenario."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from kdcache import dist
from kdcache.datasets import create_dataset
from kdcache.scenario_heads import scenario_teacher_head, teacher_logits
from kdcache.engine import (
    FitPlan,
    TrainModule,
    append_metrics,
    cosine_schedule,
    fit,
    load_checkpoint,
    make_optimizer,
    restore,
    save_checkpoint,
    truncate_metrics,
)
from kdcache.cache.backend import open_mode
from kdcache.loader import StreamConfig, labelled_repeats, make_loader, num_batches, rank_shards, samples_in
from kdcache.methods import create_method
from kdcache.methods.base import Dims, MethodContext
from kdcache.report import TensorBoardLog, check_tensorboard, metrics_csv
from kdcache.scenarios import make_scenario
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.students import create_student
from kdcache.views import REPLAY_VERSION

from .config import ConfigError, cache_location, local_path, to_dict, write_yaml
from .schema import DistillConfig  # noqa: F401  (stage.DistillConfig)

# options that may differ when a run is resumed
RESUMABLE_CHANGES = {"resume", "epochs", "workers", "progress", "device", "tensorboard"}




def open_cache(path: str) -> CacheStore:
    """Open a complete, intact cache, or stop with what is wrong and the command that fixes it.

    Cheap checks only (no data array is read): every shard done, the head fitted, no shard file of a
    done shard missing, labels / domains / splits equal to their recorded digests. `info --verify`
    reads everything back."""
    from kdcache.cacheinfo import cache_problems

    store = CacheStore.open(path, mode=open_mode(path))
    done = store.shard_done()
    extract_cmd = store.meta.command or "python cli.py extract ... --out " + shlex.quote(str(path))
    if not done.all():
        missing = int((~done).sum())
        raise CacheError(f"cache {path} is incomplete: {missing} of {len(done)} shards are not extracted; "
                         f"resume with: {extract_cmd}")
    problems = cache_problems(store, read_keys=False)
    if problems:
        raise CacheError(f"cache {path} cannot be trained on: " + "; ".join(problems)
                         + f" (extract command: {extract_cmd})")
    replay = store.meta.replay
    if replay != REPLAY_VERSION:
        raise CacheError(f"cache {path} was extracted with view replay v{replay}; this kdcache replays views as "
                         f"v{REPLAY_VERSION}, so the student would not see what the teacher saw: re-extract with "
                         "--overwrite")
    return store


def online_teacher(store: CacheStore, weights: str | None, head):
    """The cache's own teacher, rebuilt to run on every step (the `--online-teacher` reference).

    Its weights must be the ones the cache was made from (compared by sha256), so the cached and the
    online runs learn from the same teacher. Returns (teacher, head): the head that turns its features
    into the scenario's logits.
    """
    from kdcache.teachers import LinearHead, create_teacher, zeroshot_head

    ext = store.meta.extract_config
    weights = weights or ext.get("teacher_weights")
    if weights and not Path(weights).is_file():
        raise CacheError(f"--online-teacher: teacher weights {weights} not found; pass --teacher-weights FILE")
    teacher = create_teacher(ext.get("teacher", store.meta.teacher), weights, bool(ext.get("random_init")),
                             ext.get("feature", "auto"), ext.get("teacher_input_size"))
    if teacher.weights_tag != store.meta.teacher_weights:
        raise CacheError(f"--online-teacher: weights {teacher.weights_tag} are not the cache's teacher "
                         f"({store.meta.teacher_weights}); pass the file it was extracted with as --teacher-weights")
    kind = store.meta.head_kind
    if head is None and kind == "probe":
        g = store.group["heads/extract"]
        head = LinearHead(torch.from_numpy(g["weight"][:]), torch.from_numpy(g["bias"][:]))
    elif head is None and kind == "native":
        teacher.set_head("native")
    elif head is None and kind == "zeroshot":
        teacher.set_head("zeroshot", zeroshot_head(teacher, list(store.meta.classes)))
    return teacher, head


def check_dataset(store: CacheStore) -> None:
    """If the original dataset is reachable, it must still be the one the cache was made from."""
    ext = store.meta.extract_config
    name, root = ext.get("dataset"), ext.get("data_root")
    if name not in ("synthetic", "mnist5k") and (not root or not Path(root).is_dir()):
        warnings.warn(f"dataset root {root!r} not found: streaming the packed shards of the cache without "
                      "re-checking the dataset fingerprint")
        return
    options = dict(ext.get("dataset_options") or [])
    if ext.get("domains"):
        options["domains"] = list(ext["domains"])
    current = create_dataset(name, root, **options).fingerprint()
    recorded = store.meta.dataset_fingerprint
    if current != recorded:
        raise CacheError(f"dataset {name} at {root} changed since extraction (fingerprint {current[:12]} != "
                         f"{recorded[:12]}): re-run extract with --overwrite, or pass --no-check-dataset to "
                         "train on the images packed in the cache")


def _scenario(store: CacheStore, cfg: DistillConfig):
    return make_scenario(cfg.scenario, store.array("labels")[:], store.array("domains")[:],
                         store.array("splits")[:], store.status(), list(store.meta.domains), cfg.source, cfg.target,
                         cfg.labels_per_class, cfg.seed, cfg.closed_set)


# options added after runs were first saved, at the value every earlier run had: a config that leaves them at
# that value names and resumes runs exactly as before
DEFAULTS_ADDED_LATER = {"decay_norm_bias": True}


def config_hash(cfg: DistillConfig, store: CacheStore) -> str:
    """8 hex digits naming what a run computes: its settings (those a resume may change left out) and
    the cache's fingerprint."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES | {"out"}
                and not (k in DEFAULTS_ADDED_LATER and v == DEFAULTS_ADDED_LATER[k])}
    text = json.dumps(settings, sort_keys=True, default=str) + store.fingerprint()
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(cfg: DistillConfig, store: CacheStore) -> str:
    """runs/<UTC time>-<method>-<student>-<config hash>: two runs never share a folder by default."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg.method}-{cfg.student.replace('/', '-')}-{config_hash(cfg, store)}"


def default_out(cfg: DistillConfig, store: CacheStore, runs: Path = Path("runs")) -> Path:
    """A new run folder; with --resume, the newest folder of a run with these settings on this cache."""
    if not cfg.resume:
        return runs / run_name(cfg, store)
    pattern = f"*-{cfg.method}-{cfg.student.replace('/', '-')}-{config_hash(cfg, store)}"
    found = sorted(p for p in runs.glob(pattern) if p.is_dir())
    if not found:
        raise CacheError(f"--resume: no run in {runs}/ has these settings on this cache ({pattern}); pass the run "
                         "folder printed when it started as --out")
    return found[-1]


def check_config(cfg: DistillConfig) -> None:
    """Range checks of every numeric option; each error names the flag."""
    cache_location(cfg.cache, "--cache")
    local_path(cfg.out, "--out")
    if cfg.tensorboard:
        check_tensorboard()
    ranges = [("epochs", cfg.epochs, 1, None), ("batch_size", cfg.batch_size, 1, None),
              ("lr", cfg.lr, None, None), ("weight_decay", cfg.weight_decay, 0, None),
              ("warmup_epochs", cfg.warmup_epochs, 0, None), ("workers", cfg.workers, 0, None),
              ("eval_every", cfg.eval_every, 0, None), ("teacher_adapt", cfg.teacher_adapt, 0, None),
              ("shuffle_buffer", cfg.shuffle_buffer, 1, None), ("labelled_ratio", cfg.labelled_ratio, 0, 0.99)]
    if cfg.image_size is not None:
        ranges.append(("image_size", cfg.image_size, MIN_IMAGE_SIZE, 4096))
    for name, value, low, high in ranges:
        flag = "--" + name.replace("_", "-")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"{flag} must be {bound}, got {value}")
    if not cfg.lr > 0 or not np.isfinite(cfg.lr):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown --optimizer {cfg.optimizer!r}; choose adamw or sgd")


MIN_IMAGE_SIZE = 16


def _lock_run_dir(out: Path):
    """Hold an exclusive lock on the run folder for the whole run (released by the OS if the process dies);
    a second run on the same folder fails at once, naming the first."""
    import datetime
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


LOCK_FILES = {".lock", ".lock.owner"}


def _unlock_run_dir(out: Path, lock) -> None:
    """Release the run folder; a folder in which nothing was started is removed (no empty run left)."""
    started = {f.name for f in out.iterdir()} - LOCK_FILES
    if not started:
        (out / ".lock.owner").unlink(missing_ok=True)
    lock.release()
    if not started:
        (out / ".lock").unlink(missing_ok=True)
        out.rmdir()


def _shared_default_out(cfg: DistillConfig, store: CacheStore, rank: int) -> Path:
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


def run(cfg: DistillConfig) -> Path:
    """Train (or resume) a student; returns the run folder."""
    check_config(cfg)
    rank, world = dist.init()
    store = open_cache(cfg.cache)
    out = Path(cfg.out) if cfg.out else _shared_default_out(cfg, store, rank)
    lock = _lock_run_dir(out) if rank == 0 else None
    try:
        return _run(cfg, rank, world, store, out)
    finally:
        if lock is not None:
            _unlock_run_dir(out, lock)


def _student_and_method(cfg: DistillConfig, store: CacheStore):
    meta = store.meta
    num_classes = len(meta.classes)
    student = create_student(cfg.student, num_classes, cfg.student_weights)
    sdims = student.dims(cfg.image_size or student.default_size)
    dims = Dims(sdims["feature"], meta.feature_dim, num_classes, sdims["map"], meta.layout.token_grid, meta.token_dim)
    return student, create_method(cfg.method, dims, **dict(cfg.method_options))


def _context(store, scenario, student, method, head, device, seed: int, write: bool) -> MethodContext:
    logits = (lambda mask, view=None: teacher_logits(store, head, mask, view)) if method.needs_logits else None
    return MethodContext(store, scenario, student, device, seed, write, logits)


def precompute(cfg: DistillConfig) -> None:
    """Compute and keep what a run would derive from the cache before training (the scenario's teacher
    head, the method's statistics, and its per-epoch phases for `cfg.epochs` epochs where the method
    can compute them ahead), without training: many runs started at once then read it instead of each
    computing it."""
    store = CacheStore.open(cfg.cache, mode="r+")
    scenario = _scenario(store, cfg)
    student, method = _student_and_method(cfg, store)
    head = None
    if method.needs_logits:
        head, _ = scenario_teacher_head(store, scenario, write=True, adapt_rounds=cfg.teacher_adapt)
    ctx = _context(store, scenario, student, method, head, dist.device_for(cfg.device), cfg.seed, True)
    method.prepare(ctx)
    method.precompute(ctx, cfg.epochs, progress=cfg.progress)


def epoch_repeats(scenario, uses_unlabelled: bool, labelled_ratio: float) -> np.ndarray:
    """How often each row is drawn in an epoch."""
    if uses_unlabelled:
        return labelled_repeats(scenario.labelled, scenario.unlabelled, labelled_ratio)
    # the supervised baseline sees as many (labelled) images per epoch as the others
    n_epoch = int(scenario.labelled.sum() + scenario.unlabelled.sum())
    return scenario.labelled.astype(np.int32) * max(1, round(n_epoch / int(scenario.labelled.sum())))


def check_batches(student, cfg: DistillConfig, samples: int) -> None:
    """A student with BatchNorm layers cannot train on a batch of one image (training-mode BatchNorm normalises
    over the batch; at small sizes its last layers see one value per channel). The stream never ends an epoch
    with a batch of one, so only --batch-size 1, or an epoch of one sample, would give one."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        return
    if cfg.batch_size < 2:
        raise ConfigError(f"--batch-size 1: student {cfg.student} has BatchNorm layers, which cannot train on one "
                          "image at a time; use --batch-size 2 or more")
    if samples < 2:
        raise ConfigError(f"--scenario {cfg.scenario}: an epoch holds {samples} training sample(s) here, and student "
                          f"{cfg.student} has BatchNorm layers, which need 2 or more a batch; give the scenario more "
                          "rows, or use a --student without BatchNorm")


def _run(cfg: DistillConfig, rank: int, world: int, store: CacheStore, out: Path) -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.check_dataset and rank == 0:
        check_dataset(store)
    scenario = _scenario(store, cfg)
    meta = store.meta
    student, method = _student_and_method(cfg, store)
    num_classes = len(meta.classes)
    image_size = cfg.image_size or student.default_size
    device = dist.device_for(cfg.device)
    repeats, lay = epoch_repeats(scenario, method.uses_unlabelled, cfg.labelled_ratio), store.layout
    per_rank = [samples_in(rank_shards(repeats, lay.shard_size, cfg.seed, 0, r, world), repeats, lay.shard_size)
                for r in range(world)]
    check_batches(student, cfg, min(per_rank))
    # derived data (probe head, method statistics) is written once by rank 0, then read by the other ranks
    head, head_info = None, {"teacher_head": meta.head_kind, "refit": False}

    def context(write: bool) -> MethodContext:
        return _context(store, scenario, student, method, head, device, cfg.seed, write)

    def derived(write: bool):
        nonlocal head, head_info
        if method.needs_logits:
            head, head_info = scenario_teacher_head(store, scenario, write=write, adapt_rounds=cfg.teacher_adapt)
        method.prepare(context(write))
        if write:  # phases the method can compute ahead (kept with the cache; a resumed run reads them)
            method.precompute(context(write), cfg.epochs, progress=cfg.progress)

    if rank == 0:
        derived(write=True)
    dist.barrier()
    if rank != 0:
        derived(write=False)
    ctx = context(rank == 0)

    amp = device.type == "cuda"
    channels_last = device.type == "cuda"
    teacher = None
    if cfg.online_teacher:
        teacher, head = online_teacher(store, cfg.teacher_weights, head)
    module = TrainModule(student, method, head, teacher, lay.token_grid if method.needs_tokens else 0).to(device)
    if channels_last:
        module.student.to(memory_format=torch.channels_last)

    labels = np.where(scenario.labelled, store.array("labels")[:], -1).astype(np.int64)
    steps_per_epoch = max(1, min(per_rank) // cfg.batch_size if world > 1 else num_batches(per_rank[0], cfg.batch_size))
    optimizer = make_optimizer(cfg.optimizer, module, cfg.lr, cfg.weight_decay, cfg.decay_norm_bias)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * cfg.epochs, int(steps_per_epoch * cfg.warmup_epochs))

    fingerprint = store.fingerprint()
    start_epoch = _prepare_run_dir(out, cfg, rank, module, optimizer, scheduler, fingerprint)
    train_module = module
    if world > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    cached = teacher is None
    stream = StreamConfig(str(store.path), image_size, student.interpolation, cfg.seed, cfg.shuffle_buffer,
                          logits=cached and method.needs_logits and head is None, tokens=cached and method.needs_tokens,
                          features=cached and (method.needs_features or head is not None),
                          teacher_size=0 if cached else teacher.preprocess.input_size,
                          teacher_interpolation="bicubic" if cached else teacher.preprocess.interpolation)
    eval_stream = StreamConfig(str(store.path), image_size, student.interpolation, cfg.seed, clean_only=True,
                               features=False)
    eval_labels = store.array("labels")[:].astype(np.int64)
    eval_reps = scenario.evaluation.astype(np.int32)
    domains, domain_names = store.array("domains")[:], list(meta.domains)
    if rank == 0:
        print(f"{out.name}: {scenario.description}, {scenario.counts()}, teacher head "
              f"{head_info['teacher_head']}{' (refit: ' + head_info['reason'] + ')' if head_info['refit'] else ''}",
              file=sys.stderr)

    tensorboard = TensorBoardLog(out, start_epoch) if cfg.tensorboard and rank == 0 else None

    def after_epoch(epoch: int, record: dict) -> None:
        if rank != 0:
            return
        state = {"epoch": epoch, "config": to_dict(cfg), "cache_fingerprint": fingerprint,
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
        # metrics first: a kill between the two leaves a record that --resume drops and redoes
        append_metrics(out / "metrics.jsonl", record)
        metrics_csv(out)
        if tensorboard is not None:
            tensorboard.log(record)
        save_checkpoint(out, epoch, student, method, state)
        if cfg.progress:
            ev = record.get("eval", {})
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record.get('loss', float('nan')):.4f} "
                  f"{record['img_per_s']:.0f} img/s" + (f", top-1 {ev['top1']:.4f}" if ev else ""),
                  file=sys.stderr)

    plan = FitPlan(cfg.epochs, start_epoch, steps_per_epoch, cfg.eval_every, rank, world, amp, channels_last,
                   cfg.progress, int(eval_reps.sum()))

    def train_loader(epoch: int):
        shards = rank_shards(repeats, lay.shard_size, cfg.seed, epoch, rank, world)
        return make_loader(stream, shards, repeats, labels, epoch, cfg.batch_size, cfg.workers,
                           pin_memory=device.type == "cuda")

    def eval_loader():
        shards = rank_shards(eval_reps, lay.shard_size, 0, 0, 0, 1, False)
        return make_loader(eval_stream, shards, eval_reps, eval_labels, 0, max(cfg.batch_size, 128), cfg.workers)

    fit(module, train_module, optimizer, scheduler, device, plan, train_loader, eval_loader, (domains, domain_names),
        before_epoch=lambda epoch: method.before_epoch(ctx, epoch),  # the method's own phase, if it has one
        after_epoch=after_epoch, barrier=dist.barrier, end_epoch=lambda epoch: method.end_epoch(ctx, epoch))
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(
            {"name": out.name, "student": cfg.student, "method": cfg.method, "scenario": scenario.description,
             "cache": str(store.path), "teacher": meta.teacher, "num_classes": num_classes,
             "image_size": image_size, "head": head_info, "counts": scenario.counts(),
             "scenario_digest": scenario.digest()}, indent=2))
    return out


def _prepare_run_dir(out: Path, cfg: DistillConfig, rank: int, module, optimizer, scheduler,
                     fingerprint: str) -> int:
    """Create the run folder, or restore the last checkpoint with --resume; returns the first epoch."""
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
            write_yaml(cfg, out / "config.yaml")
        return 0
    path, state = found
    if not cfg.resume:
        raise CacheError(f"run folder {out} has a checkpoint ({path.name}); continue it with the same command plus "
                         f"--resume --out {shlex.quote(str(out))}, or "
                         "choose another --out")
    if state.get("cache_fingerprint", fingerprint) != fingerprint:
        raise CacheError(f"--resume: the cache at {cfg.cache} is not the one run {out} started from (fingerprint "
                         f"{state['cache_fingerprint'][:12]}, now {fingerprint[:12]}); resume with the original "
                         "cache, or start a new run with another --out")
    saved = dict(DEFAULTS_ADDED_LATER, **state["config"])  # a run saved before an option existed had its default
    now = to_dict(cfg)
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise CacheError("--resume with another config: " + ", ".join(f"{k} was {saved.get(k)!r}, now "
                                                                       f"{now.get(k)!r}" for k in changed)
                         + "; use the original flags or a new --out")
    done = state["epoch"] + 1
    if cfg.epochs < done:  # checked before anything in the run folder changes
        raise ConfigError(f"--epochs {cfg.epochs}: run {out} has already trained {done} epochs; resume it with "
                          f"--epochs {done} or more, or start a new run with another --out")
    restore(path, module.student, module.method)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if rank == 0:
        truncate_metrics(out / "metrics.jsonl", state["epoch"])
        write_yaml(cfg, out / "config.yaml")
    return state["epoch"] + 1
