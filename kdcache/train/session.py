"""One training run on an open cache: derived data, the student module, step arithmetic, the train and
eval streams, the epoch loop with its checkpoint callback, and the run's summary.json."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import dist
from kdcache.options import ConfigError, to_dict
from kdcache.report import TensorBoardLog
from kdcache.cache.store import CacheStore
from kdcache.scenario_heads import scenario_teacher_head

from .ema import AveragedStudent
from .engine import FitPlan, TrainModule, cosine_schedule, fit, make_optimizer, predict
from .replay_check import ReplayCosine
from .inputs import check_dataset, method_context, online_teacher, scenario_of, student_and_method
from .loader import StreamConfig, labelled_repeats, make_loader, num_batches, rank_shards, samples_in
from .run_dir import prepare_run_dir, save_epoch


def epoch_repeats(scenario, uses_unlabelled: bool, labelled_ratio: float) -> np.ndarray:
    """How often each row is drawn in an epoch."""
    if uses_unlabelled:
        return labelled_repeats(scenario.labelled, scenario.unlabelled, labelled_ratio)
    # the supervised baseline sees as many (labelled) images per epoch as the others
    n_epoch = int(scenario.labelled.sum() + scenario.unlabelled.sum())
    return scenario.labelled.astype(np.int32) * max(1, round(n_epoch / int(scenario.labelled.sum())))


def check_batches(student, cfg, samples: int) -> None:
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


@dataclass
class Session:
    """What a run is made of, once the cache, scenario, student and method are known."""

    cfg: object
    store: CacheStore
    out: Path
    rank: int
    world: int
    scenario: object
    student: object
    method: object
    device: torch.device
    repeats: np.ndarray
    head: object = None
    head_info: dict | None = None
    steps_per_epoch: int = 1

    def context(self, write: bool):
        return method_context(self.store, self.scenario, self.student, self.method, self.head, self.device,
                              self.cfg.seed, write, self.cfg.epochs)

    def derive(self, write: bool) -> None:
        """The scenario's teacher head and the method's statistics (and, writing, the phases it computes
        ahead, kept with the cache so a resumed run reads them)."""
        cfg = self.cfg
        if self.method.needs_logits:
            self.head, self.head_info = scenario_teacher_head(self.store, self.scenario, write=write,
                                                              adapt_rounds=cfg.teacher_adapt)
        self.method.prepare(self.context(write))
        if write:
            self.method.precompute(self.context(write), cfg.epochs, progress=cfg.progress)

    def replay_logits(self) -> bool:
        """The online teacher's logits are the cached ones: the cache has a head and no refit replaced it."""
        return self.store.layout.num_classes > 0 and not (self.head_info or {}).get("refit")

    def proves_replay(self, teacher) -> bool:
        """An online teacher on the cache's own views: its outputs are compared with the cached ones (fresh views
        have none to compare with)."""
        return teacher is not None and self.cfg.online_views == "cached"

    def streams(self, teacher, image_size: int) -> tuple[StreamConfig, StreamConfig]:
        """(train, eval) stream settings: the cached outputs the method reads, or the online teacher's size."""
        method, cached, path = self.method, teacher is None, str(self.store.path)
        # online: the cached outputs are read only for the replay proof (the teacher's own replace them)
        proof = self.proves_replay(teacher)
        train = StreamConfig(path, image_size, self.student.interpolation, self.cfg.seed, self.cfg.shuffle_buffer,
                             logits=method.needs_logits and self.head is None if cached else
                             proof and self.replay_logits(),
                             tokens=cached and method.needs_tokens,
                             features=method.needs_features or self.head is not None if cached else proof,
                             teacher_size=0 if cached else teacher.preprocess.input_size,
                             teacher_interpolation="bicubic" if cached else teacher.preprocess.interpolation,
                             fresh_views=not cached and not proof, interleave=self.cfg.interleave,
                             clean_share=self.cfg.clean_share)
        return train, StreamConfig(path, image_size, self.student.interpolation, self.cfg.seed, clean_only=True,
                                   features=False)


def open_session(cfg, rank: int, world: int, store: CacheStore, out: Path) -> Session:
    """Check the dataset, draw the scenario, build student and method, and derive what they read from the
    cache (rank 0 writes it, the other ranks read it)."""
    torch.manual_seed(cfg.seed)
    if cfg.check_dataset and rank == 0:
        check_dataset(store)
    scenario = scenario_of(store, cfg)
    student, method = student_and_method(cfg, store)
    repeats, shard_size = epoch_repeats(scenario, method.uses_unlabelled, cfg.labelled_ratio), store.layout.shard_size
    s = Session(cfg, store, out, rank, world, scenario, student, method, dist.device_for(cfg.device), repeats,
                head_info={"teacher_head": store.meta.head_kind, "refit": False})
    per_rank = [samples_in(rank_shards(repeats, shard_size, cfg.seed, 0, r, world), repeats, shard_size)
                for r in range(world)]
    check_batches(student, cfg, min(per_rank))
    s.steps_per_epoch = max(1, min(per_rank) // cfg.batch_size if world > 1 else
                            num_batches(per_rank[0], cfg.batch_size))
    if rank == 0:
        s.derive(write=True)
    dist.barrier()
    if rank != 0:
        s.derive(write=False)
    return s


def train(cfg, rank: int, world: int, store: CacheStore, out: Path, previous=None) -> Path:
    """Train (or resume) the run in `out`; returns `out`. `previous`: (student, image size) of a first generation
    (`--from-run`), whose clean-view predictions the method mixes into its targets."""
    s = open_session(cfg, rank, world, store, out)
    ctx, device, method, student = s.context(rank == 0), s.device, s.method, s.student
    teacher = None
    if cfg.online_teacher:
        teacher, s.head = online_teacher(store, cfg.teacher_weights, s.head)
    grid = store.layout.token_grid if method.needs_tokens else 0
    module = TrainModule(student, method, s.head, teacher, grid).to(device)
    if s.proves_replay(teacher):
        module.replay = ReplayCosine(logits=s.replay_logits(), topk=store.layout.logits_topk,
                                     int8=store.layout.feature_dtype == "int8")
    if device.type == "cuda":
        module.student.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, module, cfg.lr, cfg.weight_decay, cfg.decay_norm_bias)
    scheduler = cosine_schedule(optimizer, s.steps_per_epoch * cfg.epochs, int(s.steps_per_epoch * cfg.warmup_epochs))
    fingerprint = store.fingerprint()
    ema = AveragedStudent(student, cfg.ema) if cfg.ema > 0 else None  # after the move: on the same device
    start_epoch = prepare_run_dir(out, cfg, rank, module, optimizer, scheduler, fingerprint, ema)
    train_module = module
    if world > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    image_size = cfg.image_size or student.default_size
    if rank == 0:
        info = s.head_info
        print(f"{out.name}: {s.scenario.description}, {s.scenario.counts()}, teacher head "
              f"{info['teacher_head']}{' (refit: ' + info['reason'] + ')' if info['refit'] else ''}", file=sys.stderr)
    tensorboard = TensorBoardLog(out, start_epoch) if cfg.tensorboard and rank == 0 else None

    def after_epoch(epoch: int, record: dict) -> None:
        if rank == 0:
            state = {"epoch": epoch, "config": to_dict(cfg), "cache_fingerprint": fingerprint,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state()}
            save_epoch(out, cfg, epoch, record, student, method, state, tensorboard, ema)

    eval_reps = s.scenario.evaluation.astype(np.int32)
    plan = FitPlan(cfg.epochs, start_epoch, s.steps_per_epoch, cfg.eval_every, rank, world, device.type == "cuda",
                   device.type == "cuda", cfg.progress, int(eval_reps.sum()))
    train_loader, clean_loader = _loaders(s, teacher, image_size)
    eval_loader = lambda: clean_loader(eval_reps)  # noqa: E731
    recorder = student if ema is None else ema.student  # the averaged student, when the run keeps one

    def predict_clean(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, logits): the student's evaluation-mode predictions on the clean view of the masked rows,
        in row order (every rank predicts every masked row, so each holds the same record)."""
        logits, _, rows = predict(recorder, clean_loader(mask.astype(np.int32)), device, plan.channels_last)
        return rows, logits

    ctx.predict_clean = predict_clean
    if previous is not None:
        ctx.previous_student, ctx.previous_weight = _previous_predictor(s, *previous), cfg.from_run_weight
    domains = (store.array("domains")[:], list(store.meta.domains))
    fit(module, train_module, optimizer, scheduler, device, plan, train_loader, eval_loader, domains,
        before_epoch=lambda epoch: method.before_epoch(ctx, epoch),  # the method's own phase, if it has one
        after_epoch=after_epoch, barrier=dist.barrier, end_epoch=lambda epoch: method.end_epoch(ctx, epoch), ema=ema)
    if rank == 0:
        write_summary(s, image_size, module.replay.summary() if module.replay is not None else None)
    return out


def _loaders(s: Session, teacher, image_size: int):
    """(epoch -> train loader of this rank, repeats -> loader of the clean view of every row repeated once:
    the evaluation rows, or the rows a method predicts between epochs)."""
    cfg, store, shard_size = s.cfg, s.store, s.store.layout.shard_size
    stream, clean_stream = s.streams(teacher, image_size)
    labels = np.where(s.scenario.labelled, store.array("labels")[:], -1).astype(np.int64)
    all_labels = store.array("labels")[:].astype(np.int64)

    def train_loader(epoch: int):
        shards = rank_shards(s.repeats, shard_size, cfg.seed, epoch, s.rank, s.world)
        return make_loader(stream, shards, s.repeats, labels, epoch, cfg.batch_size, cfg.workers,
                           pin_memory=s.device.type == "cuda", classes=all_labels)

    def clean_loader(reps: np.ndarray):
        shards = rank_shards(reps, shard_size, 0, 0, 0, 1, False)
        return make_loader(clean_stream, shards, reps, all_labels, 0, max(cfg.batch_size, 128), cfg.workers)

    return train_loader, clean_loader


def _previous_predictor(s: Session, first, image_size: int):
    """mask -> (rows, logits): a first generation's student's predictions on the clean view of the masked rows, at
    its own input size, in row order."""
    first = first.to(s.device)
    stream = StreamConfig(str(s.store.path), image_size, first.interpolation, s.cfg.seed, clean_only=True,
                          features=False)
    labels = s.store.array("labels")[:].astype(np.int64)

    def predict_first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        reps = mask.astype(np.int32)
        shards = rank_shards(reps, s.store.layout.shard_size, 0, 0, 0, 1, False)
        loader = make_loader(stream, shards, reps, labels, 0, max(s.cfg.batch_size, 128), s.cfg.workers)
        logits, _, rows = predict(first, loader, s.device)
        return rows, logits

    return predict_first


def cache_location(path) -> str:
    """Where a cache is, whatever folder a later command runs from: a local path made absolute, a URL as it is."""
    return str(path.resolve()) if isinstance(path, Path) else str(path)


def write_summary(s: Session, image_size: int, replay: dict | None = None) -> None:
    """summary.json: what evaluation and reports read about the finished run (with --online-teacher, also
    `replay_cosine`: the cached teacher outputs of the drawn views against the teacher recomputed on them)."""
    cfg, meta = s.cfg, s.store.meta
    summary = {"name": s.out.name, "student": cfg.student, "method": cfg.method, "scenario": s.scenario.description,
               "cache": str(s.store.path), "cache_location": cache_location(s.store.path),
               "cache_fingerprint": s.store.fingerprint(), "teacher": meta.teacher, "num_classes": len(meta.classes),
               "image_size": image_size, "head": s.head_info, "counts": s.scenario.counts(),
               "scenario_digest": s.scenario.digest()}
    if replay is not None:
        summary["replay_cosine"] = replay
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2))
