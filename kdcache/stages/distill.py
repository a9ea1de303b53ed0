"""Stage two: train a student from the cache (CustomKD by default) under a label scenario.

config -> checks -> the run folder (kdcache.train.run_dir) -> one training session (kdcache.train.session)."""
from __future__ import annotations

from pathlib import Path

from kdcache import dist
from kdcache.cache.format import CacheError
from kdcache.methods import parse_method_options
from kdcache.options import check_fields, check_needs
from kdcache.report import check_tensorboard
from kdcache.scenario_heads import scenario_teacher_head
from kdcache.train.inputs import method_context, open_cache, run_cache, scenario_of, student_and_method
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
        return train(cfg, rank, world, store, out, first_generation(cfg.from_run, store) if cfg.from_run else None)
    finally:
        if lock is not None:
            unlock_run_dir(out, lock)


def first_generation(run: str, store):
    """(student, image size) of the finished run a second generation learns from (`--from-run`): trained on this
    very cache (its fingerprint), its student loaded with its weights."""
    from kdcache.run_files import read_tensors
    from kdcache.students import create_student

    from .evaluate import load_run

    dcfg, summary = load_run(Path(run))
    want = summary.get("cache_fingerprint")
    if want is None:  # a run made before runs recorded their cache's fingerprint: the cache it names
        try:
            want = run_cache(Path(run), dcfg, summary, None).fingerprint()
        except CacheError as e:
            raise CacheError(f"--from-run {run}: {e}") from None
    if want != store.fingerprint():
        raise CacheError(f"--from-run {run}: that run was trained on another cache ({summary.get('cache_location')}, "
                         f"fingerprint {str(want)[:12]}); a second generation reads the first's predictions on this "
                         f"cache's rows, so give a run trained on {store.path}")
    if summary["num_classes"] != len(store.meta.classes):
        raise CacheError(f"--from-run {run}: its student has {summary['num_classes']} classes, the cache "
                         f"{len(store.meta.classes)}")
    student = create_student(dcfg.student, summary["num_classes"])
    student.model.load_state_dict(read_tensors(Path(run) / "student.safetensors", "distill that run again"))
    return student.eval(), int(summary["image_size"])


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
