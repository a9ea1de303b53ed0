"""What a training run reads before it trains: the cache (complete, intact, replayable), the dataset it was
made from, the scenario a config names, the student and its method, and the online teacher."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kdcache.datasets import create_dataset, needs_root
from kdcache.cache.backend import check_url, open_mode
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.methods import create_method
from kdcache.methods.base import Dims, MethodContext
from kdcache.scenario_heads import teacher_logits
from kdcache.scenarios import make_scenario
from kdcache.students import create_student
from kdcache.views import REPLAY_VERSION


def open_cache(path: str) -> CacheStore:
    """Open a complete, intact cache, or stop with what is wrong and the command that fixes it.

    Cheap checks only (no data array is read): every shard done, the head fitted, no shard file of a
    done shard missing, labels / domains / splits equal to their recorded digests. `info --verify`
    reads everything back."""
    from kdcache.cacheinfo import cache_problems, extract_command

    store = CacheStore.open(path, mode=open_mode(path))
    done = store.shard_done()
    extract_cmd = extract_command(store)
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


def check_dataset(store: CacheStore) -> None:
    """If the original dataset is reachable, it must still be the one the cache was made from."""
    ext = store.meta.extract_config
    name, root = ext.get("dataset"), ext.get("data_root")
    if needs_root(name) and (not root or not Path(root).is_dir()):
        warnings.warn(f"dataset root {root!r} not found: streaming the packed shards of the cache without "
                      "re-checking the dataset fingerprint")
        return
    options = dict(ext.get("dataset_options") or [])
    current = create_dataset(name, root, only_domains=ext.get("domains") or (), **options).fingerprint()
    recorded = store.meta.dataset_fingerprint
    if current != recorded:
        raise CacheError(f"dataset {name} at {root} changed since extraction (fingerprint {current[:12]} != "
                         f"{recorded[:12]}): re-run extract with --overwrite, or pass --no-check-dataset to "
                         "train on the images packed in the cache")


def scenario_of(store: CacheStore, cfg):
    """The label scenario a distill config names on this cache (its seed draws the labelled rows)."""
    return make_scenario(cfg.scenario, store.array("labels")[:], store.array("domains")[:],
                         store.array("splits")[:], store.status(), list(store.meta.domains), cfg.source, cfg.target,
                         cfg.labels_per_class, cfg.seed, cfg.closed_set)


def student_and_method(cfg, store: CacheStore):
    """The student a distill config names, and its method sized to the student and the cache."""
    meta = store.meta
    num_classes = len(meta.classes)
    student = create_student(cfg.student, num_classes, cfg.student_weights, drop_rate=getattr(cfg, "drop_rate", 0.0),
                             drop_path=getattr(cfg, "drop_path", 0.0))
    sdims = student.dims(cfg.image_size or student.default_size)
    dims = Dims(sdims["feature"], meta.feature_dim, num_classes, sdims["map"], meta.layout.token_grid, meta.token_dim)
    return student, create_method(cfg.method, dims, **dict(cfg.method_options))


def method_context(store, scenario, student, method, head, device, seed: int, write: bool,
                   epochs: int = 0) -> MethodContext:
    logits = (lambda mask, view=None: teacher_logits(store, head, mask, view)) if method.needs_logits else None
    return MethodContext(store, scenario, student, device, seed, write, logits, epochs=epochs)


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


def _places(run_dir: Path, dcfg, summary: dict) -> list[str]:
    """Where the run's cache may be, in order: the path it was given (from this folder), the absolute location the
    run recorded, and a relative path taken from the folder above `runs/` (runs made before locations were kept)."""
    out = [dcfg.cache, summary.get("cache_location")]
    if not check_url(dcfg.cache, "--cache") and not Path(dcfg.cache).is_absolute():
        out.append(str(run_dir.resolve().parent.parent / dcfg.cache))
    return list(dict.fromkeys(p for p in out if p))


def run_cache(run_dir: Path, dcfg, summary: dict, given: str | None) -> CacheStore:
    """The cache run `run_dir` was trained on: `given` (--cache), or the first of its recorded places that holds a
    cache; refused when its fingerprint (or, for runs that recorded none, its teacher) is not the run's."""
    recorded = summary.get("cache_location") or dcfg.cache
    if given is None:
        found = [p for p in _places(run_dir, dcfg, summary)
                 if check_url(p, "--cache") or (Path(p) / "zarr.json").is_file()]
        if not found:
            raise CacheError(f"the cache run {run_dir} was trained on is no longer at {recorded}; pass --cache with "
                             "where it is now")
        given = found[0]
    store = open_cache(given)
    want, teacher = summary.get("cache_fingerprint"), summary.get("teacher")
    now = store.fingerprint() if want else None
    if (want and now != want) or (not want and teacher and store.meta.teacher != teacher):
        ids = f"fingerprint {now[:12]}, run's {want[:12]}" if want else f"teacher {store.meta.teacher}, run's {teacher}"
        raise CacheError(f"the cache at {given} is not the one run {run_dir} was trained on ({ids}; trained on the "
                         f"cache at {recorded}): pass --cache with that cache")
    return store
