"""Stage two: train a student from the cache (CustomKD by default) under a label scenario.

config -> checks -> the run folder (kdcache.train.run_dir) -> one training session (kdcache.train.session)."""
from __future__ import annotations

from pathlib import Path

from kdcache import dist
from kdcache.methods import parse_method_options
from kdcache.options import check_fields, check_needs
from kdcache.report import check_tensorboard
from kdcache.scenario_heads import scenario_teacher_head
from kdcache.train.inputs import method_context, open_cache, scenario_of, student_and_method
from kdcache.train.run_dir import lock_run_dir, shared_default_out, unlock_run_dir
from kdcache.train.session import train

from .config import cache_location, local_path
from kdcache.schema import DistillConfig  # noqa: F401  (stage.DistillConfig)


def check_config(cfg: DistillConfig) -> None:
    """Where the cache and the run may live, then every declared range and choice; each error names the flag."""
    cache_location(cfg.cache, "--cache")
    local_path(cfg.out, "--out")
    if cfg.tensorboard:
        check_tensorboard()
    check_fields(cfg)
    check_needs(cfg)  # an option set to what has no effect here (the command line checks what was given)
    parse_method_options(cfg.method, dict(cfg.method_options))  # the method and its options, before the cache opens


def run(cfg: DistillConfig) -> Path:
    """Train (or resume) a student; returns the run folder."""
    check_config(cfg)
    rank, world = dist.init()
    store = open_cache(cfg.cache)
    out = Path(cfg.out) if cfg.out else shared_default_out(cfg, store, rank)
    lock = lock_run_dir(out) if rank == 0 else None
    try:
        return train(cfg, rank, world, store, out)
    finally:
        if lock is not None:
            unlock_run_dir(out, lock)


def precompute(cfg: DistillConfig) -> None:
    """Compute and keep what a run would derive from the cache before training (the scenario's teacher
    head, the method's statistics, and its per-epoch phases for `cfg.epochs` epochs where the method
    can compute them ahead), without training: many runs started at once then read it instead of each
    computing it."""
    store = open_cache(cfg.cache)  # the same checks as a run: complete, intact, replayable
    scenario = scenario_of(store, cfg)
    student, method = student_and_method(cfg, store)
    head = None
    if method.needs_logits:
        head, _ = scenario_teacher_head(store, scenario, write=True, adapt_rounds=cfg.teacher_adapt)
    ctx = method_context(store, scenario, student, method, head, dist.device_for(cfg.device), cfg.seed, True,
                         cfg.epochs)
    method.prepare(ctx)
    method.precompute(ctx, cfg.epochs, progress=cfg.progress)
