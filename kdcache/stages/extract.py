"""Stage one: run the teacher once over every image into the sharded Zarr cache."""
from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import sys
from pathlib import Path

import numpy as np

from kdcache import __version__, dist
from kdcache.datasets import create_dataset
from kdcache.extraction import DECODE_PLACES, ShardBuffer, StreamSpec, fit_probe_once, teacher_pass
from kdcache.heads import resolve_head
from kdcache.pack import remove_stale_temporaries
from kdcache.cache.backend import backend, cache_path, lock
from kdcache.cache.format import FEATURE_DTYPES, CacheError, IncompleteCreation, Layout
from kdcache.cache.store import CacheStore
from kdcache.teachers import COMPILE_MODES, TeacherError, attention_kernels, create_teacher, zeroshot_head
from kdcache.views import PARAMS, POLICY_DEFAULTS, REPLAY_VERSION, list_policies

from .config import ConfigError, cache_location, env_int, local_path, to_dict, write_yaml
from .schema import ExtractConfig  # noqa: F401  (stage.ExtractConfig)




@contextlib.contextmanager
def _creation_lock(out: Path):
    """Serialise opening/creating one cache, so two extracts started together agree on one store (on
    object storage only rank 0 of one job creates it: there is no lock there)."""
    backend(out).make_parent(out)
    with lock(out.parent / f".{out.name}.create.lock"):
        yield


MIN_IMAGE_BOUND = 16
# A view is one teacher pass over one image; a student sees one view per image per epoch, so more views than
# epochs anyone trains buy nothing, and a number like 10**9 would only fill memory and disk.
MAX_VIEWS = 1024
# One shard's teacher outputs are held in memory (a few shards at once: computing, queued, being written).
MAX_SHARD_BUFFER = 16 * 2**30


def _check(cfg: ExtractConfig) -> None:
    if not cfg.dataset:
        from kdcache.datasets import list_datasets

        raise ValueError(f"--dataset is required: one of {', '.join(list_datasets())} (synthetic: generated "
                         "test images, no folder)")
    cache_location(cfg.out, "--out")
    local_path(cfg.data_root, "--data-root")
    parse_part(cfg.part)
    if not 1 <= cfg.views <= MAX_VIEWS:
        raise ValueError(f"--views must be between 1 (view 0 is the clean view) and {MAX_VIEWS}, got {cfg.views}")
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    if cfg.tokens < 0:
        raise ValueError("--tokens must be >= 0")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    if not MIN_IMAGE_BOUND <= cfg.image_bound <= 8192:
        raise ValueError(f"--image-bound must be between {MIN_IMAGE_BOUND} and 8192 pixels, got {cfg.image_bound}")
    if cfg.teacher_input_size is not None and not MIN_IMAGE_BOUND <= cfg.teacher_input_size <= 4096:
        raise ValueError(f"--teacher-input-size must be between {MIN_IMAGE_BOUND} and 4096 pixels, "
                         f"got {cfg.teacher_input_size}")
    if cfg.view_policy not in list_policies():
        raise ValueError(f"unknown --view-policy {cfg.view_policy!r}; choose one of: {', '.join(list_policies())}")
    if cfg.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"unknown --feature-dtype {cfg.feature_dtype!r}; choose one of: {', '.join(FEATURE_DTYPES)}")
    if cfg.decode not in DECODE_PLACES:
        raise ValueError(f"unknown --decode {cfg.decode!r}; choose one of: {', '.join(DECODE_PLACES)}")
    if cfg.compile not in COMPILE_MODES:
        raise ValueError(f"unknown --compile {cfg.compile!r}; choose one of: {', '.join(COMPILE_MODES)}")
    _check_out(cache_path(cfg.out or f"cache/{cfg.dataset}"))


def _check_out(out: Path) -> None:
    """The nearest existing folder above --out is a folder (cache_location refuses an --out that is a file)."""
    for p in backend(out).parents(out):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            what = "a broken link" if not p.exists() else "a file"
            raise ConfigError(f"--out {out}: {p} is {what}, not a folder; give a folder (a new or an existing one)")


def _check_classes(cfg: ExtractConfig, dataset) -> None:
    """Distillation needs at least two classes: with one, a probe head's cross-entropy is zero whatever it
    does, so its logits are constant zeros and a student learns nothing from them. A one-class dataset is
    almost always a --data-root that points one level too deep, so it is refused, unless --head none asks for
    the teacher's features alone."""
    if len(dataset.classes) >= 2 or cfg.head == "none":
        return
    if cfg.dataset == "synthetic":
        flag, fix = "--dataset-opt classes=1", "pass --dataset-opt classes=N with N >= 2"
    else:
        flag, fix = f"--data-root {cfg.data_root}", "point --data-root at the folder whose sub-folders are the classes"
    raise ConfigError(f"{flag}: dataset {cfg.dataset!r} has only {len(dataset.classes)} class "
                      f"({', '.join(map(repr, dataset.classes))}); distillation needs at least 2: {fix}, or pass "
                      "--head none to cache the teacher's features alone")


def _clear(out: Path) -> None:
    """Remove a cache folder for --overwrite; a symlinked --out keeps its link and loses its contents."""
    backend(out).remove_tree(out)


def _open_or_create(out: Path, cfg, layout: Layout, identity: dict, attrs: dict, static: dict) -> CacheStore:
    if (out / "zarr.json").is_file():
        try:
            store = CacheStore.open(out, mode="r+")
            problems = store.mismatches(identity)
        except IncompleteCreation:
            store, problems = None, []
            _clear(out)
            return CacheStore.create(out, layout, attrs, static, compression=cfg.compression)
        except CacheError as e:
            store, problems = None, [str(e)]
        if not problems and not cfg.overwrite:
            return store
        if problems and not cfg.overwrite:
            raise CacheError(f"--out {out} holds a cache made from another teacher, dataset or settings:\n  "
                             + "\n  ".join(problems[:8])
                             + "\npass --overwrite to replace it, or choose another --out")
        _clear(out)
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise CacheError(f"--out {out} exists and is not a kdcache cache; pass --overwrite to replace it")
        _clear(out)
    store = CacheStore.create(out, layout, attrs, static, compression=cfg.compression)
    return store


def run(cfg: ExtractConfig) -> Path:
    """Extract (or resume extracting) the cache described by `cfg`; returns the cache path."""
    _check(cfg)
    rank, world = dist.init()
    out = cache_path(cfg.out or f"cache/{cfg.dataset}")
    options = dict(cfg.dataset_options)
    if cfg.domains:
        options["domains"] = list(cfg.domains)
    dataset = create_dataset(cfg.dataset, cfg.data_root, **options)
    _check_classes(cfg, dataset)
    teacher, head, device, dims = _build_teacher(cfg, dataset)
    teacher.tune(channels_last=cfg.channels_last, compile_mode=cfg.compile, batch_size=cfg.batch_size)
    unfused = attention_kernels(teacher)["unfused"]
    if unfused and rank == 0:
        print(f"warning: {unfused} attention block(s) of {teacher.name} do not use F.scaled_dot_product_attention "
              "(timm: unset TIMM_FUSED_ATTN=0); extraction is slower on a GPU", file=sys.stderr)
    pre = teacher.preprocess
    layout = Layout(n=len(dataset), views=cfg.views, feature_dim=dims["features"],
                    num_classes=len(dataset.classes) if head == "probe" else dims["logits"],
                    token_grid=cfg.tokens, token_dim=dims["tokens"], shard_size=cfg.shard_size, params=len(PARAMS),
                    feature_dtype=cfg.feature_dtype)
    _check_shard_buffer(layout)
    identity, attrs, static = _describe(cfg, dataset, teacher, head, dims)

    error = None
    if rank == 0:
        try:
            with _creation_lock(out):
                store = _open_or_create(out, cfg, layout, identity, attrs, static)
                # the resolved options, beside the cache (not inside the Zarr root; the attributes hold them too)
                write_yaml(cfg, out.with_name(out.name + ".extract.yaml"))
        except CacheError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise CacheError(error)
    if rank != 0:
        store = CacheStore.open(out, mode="r+")

    if rank == 0:
        remove_stale_temporaries(store.images_dir)
    if cfg.repair and rank == 0:
        _repair(store, static)
    if rank == 0 and head == "probe" and store.meta.head_fitted and not store.shard_done().all():
        # shards to (re)compute carry no probe logits yet: fit again (deterministically) once all are done
        store.update_attrs(head_fit={"fitted": False})
    dist.barrier()

    part, parts = parse_part(cfg.part)
    done = store.shard_done()
    mine = [k for k in my_shards(layout.num_shards, part, parts, rank, world) if not done[k]]
    spec = StreamSpec(str(store.images_dir), layout, cfg.image_bound, pre.input_size, pre.interpolation,
                      pre.crop_pct, cfg.view_policy, cfg.view_seed, cfg.batch_size, cfg.decode)
    try:
        stats = teacher_pass(store, dataset, teacher, spec, mine, workers=cfg.workers, device=device,
                             progress=cfg.progress and rank == 0)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CacheError(f"disk full while writing the cache at {out} ({e}); free some space and run the same "
                             "command again: finished shards are kept, the rest are computed") from None
        raise
    LAST_PASS.clear()
    LAST_PASS.update(stats.as_dict())
    if rank == 0 and stats.images:
        print(f"extracted {stats.images} images x {layout.views} views in {stats.shards} shard(s) at "
              f"{stats.images / max(stats.seconds, 1e-9):.1f} img/s", file=sys.stderr)
    dist.barrier()

    if rank == 0:
        fit_probe_once(store)
    return out


def _describe(cfg: ExtractConfig, dataset, teacher, head: str, dims: dict) -> tuple[dict, dict, dict]:
    """(identity, attributes, static arrays) of the cache these options make."""
    described = dataset.describe()
    identity = {
        "teacher": {"name": teacher.name, "source": teacher.source, "weights": teacher.weights_tag,
                    "feature_point": teacher.feature_point, "feature_dim": dims["features"],
                    "preprocess": teacher.preprocess.as_dict()},
        "dataset": {k: described[k] for k in ("name", "N", "classes", "domains", "splits", "fingerprint")},
        "views": {"V": cfg.views, "policy": cfg.view_policy, "seed": cfg.view_seed, "params": list(PARAMS),
                  "replay": REPLAY_VERSION,
                  "policy_params": POLICY_DEFAULTS[cfg.view_policy],
                  # views replayed on the device match the workers' within a pixel level (device_views)
                  **({"decode": cfg.decode} if cfg.decode != "workers" else {})},
        "head": {"kind": head},
        "pack": {"image_bound": cfg.image_bound, "shard_size": cfg.shard_size},
        "tokens": {"grid": cfg.tokens, "dim": dims["tokens"]},
        "storage": {"feature_dtype": cfg.feature_dtype},
    }
    attrs = dict(identity, dataset_root=described["root"], pipeline_version=__version__,
                 dataset_layout=described["layout"],  # outside the identity: the fingerprint covers it
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 command=" ".join(sys.argv), config=to_dict(cfg), head_fit={"fitted": head != "probe"})
    static = {"labels": np.array([s.label for s in dataset.samples], np.int32),
              "domains": np.array([s.domain for s in dataset.samples], np.int16),
              "splits": np.array([s.split for s in dataset.samples], np.int8),
              "keys": np.array([s.key for s in dataset.samples], dtype=object).astype(str)}
    return identity, attrs, static


def _build_teacher(cfg: ExtractConfig, dataset):
    """(teacher with its head, head kind, device, output sizes); a --teacher-input-size the model cannot take
    (timm asserts or fails at build or at the first forward pass) is an error naming the flag."""
    teacher = None
    try:
        teacher = create_teacher(cfg.teacher, cfg.teacher_weights, cfg.random_init, cfg.feature,
                                 cfg.teacher_input_size)
        head = resolve_head(cfg.head, teacher, dataset)
        if head == "zeroshot":
            teacher.set_head("zeroshot", zeroshot_head(teacher, dataset.classes))
        elif head == "native":
            teacher.set_head("native")
        device = dist.device_for(cfg.device)
        teacher.to(device)
        dims = teacher.dims(cfg.tokens)
    except (AssertionError, RuntimeError) as e:
        size = cfg.teacher_input_size
        if size is None:
            raise
        raise TeacherError(f"--teacher-input-size {size}: teacher {cfg.teacher} cannot take {size}x{size} images "
                           f"({str(e).strip().rstrip('.')}); {_input_size_hint(cfg.teacher, teacher, size)}") from None
    return teacher, head, device, dims


def _input_size_hint(name: str, teacher, size: int) -> str:
    """Which --teacher-input-size values the model takes: multiples of a ViT's patch size, else its own size."""
    import timm

    base = name.split(".")[0]
    pretrained = timm.models.get_pretrained_cfg(base) if timm.is_model(base) else None
    own = f"its own input size is {pretrained.input_size[-1]} (omit the flag to use it)" if pretrained else \
        "omit the flag to use the model's own input size"
    patch = getattr(getattr(getattr(teacher, "model", None), "patch_embed", None), "patch_size", None)
    if patch is None and re.search(r"patch(\d+)", base):
        patch = int(re.search(r"patch(\d+)", base).group(1))
    if patch is not None:
        p = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        lo = max(p, size // p * p)
        return f"use a multiple of its patch size {p}, e.g. {lo} or {lo + p}; {own}"
    return f"use a larger size; {own}"


def _check_shard_buffer(layout: Layout) -> None:
    """One shard's outputs must fit in memory; checked before the cache is created, so an absurd --views or
    --shard-size leaves nothing behind."""
    nbytes = ShardBuffer.nbytes(layout.shard_size, layout)
    if nbytes > MAX_SHARD_BUFFER:
        raise ConfigError(f"--views {layout.views} with --shard-size {layout.shard_size} needs "
                          f"{nbytes / 2**30:.0f} GiB of memory per shard of teacher outputs (at most "
                          f"{MAX_SHARD_BUFFER // 2**30} GiB); use fewer --views or a smaller --shard-size")


def _repair(store: CacheStore, static: dict) -> None:
    """Recompute exactly what is damaged: shards whose arrays or packed images differ from their checksums
    (a damaged tar is packed again from the dataset), and static arrays that differ from the dataset."""
    from kdcache.cacheinfo import IMAGES, damaged_shards, head_problems
    from kdcache.pack import shard_name
    from kdcache.cache.integrity import missing_files, repair_static

    if head_problems(store):
        print("repair: the probe head is missing or damaged; refitting it", file=sys.stderr)
        store.update_attrs(head_fit={"fitted": False})
    repair_static(store, static, lambda name: print(f"repair: array {name} differs from the dataset; rewriting it",
                                                    file=sys.stderr))
    damaged = damaged_shards(store)
    for k, why in sorted(damaged.items()):
        print(f"repair: shard {k} {why}; recomputing it", file=sys.stderr)
        if why.startswith(IMAGES):
            (store.images_dir / shard_name(k)).unlink(missing_ok=True)
        store.mark_todo(k)
    missing = {k for _, k in missing_files(store)}
    for k in sorted(missing - set(damaged)):
        print(f"repair: shard {k} has missing files; recomputing it", file=sys.stderr)
        store.mark_todo(k)
    if not damaged and not missing:
        print("repair: every done shard matches its checksum", file=sys.stderr)


def parse_part(text: str | None) -> tuple[int, int]:
    """`--part i/N` (a job-array task's share: shards k with k % N == i), `auto/N` or `auto` (the index,
    and the count where the scheduler gives it, from SLURM_ARRAY_TASK_ID / _MIN / _COUNT or a Kubernetes
    indexed job's JOB_COMPLETION_INDEX); None: the whole cache."""
    if not text:
        return 0, 1
    env = os.environ
    index_text, _, count_text = text.partition("/")
    if index_text == "auto":
        if "SLURM_ARRAY_TASK_ID" in env:
            index = env_int("SLURM_ARRAY_TASK_ID", "--part") - env_int("SLURM_ARRAY_TASK_MIN", "--part", 0)
            count_text = count_text or str(env_int("SLURM_ARRAY_TASK_COUNT", "--part", ""))
        elif "JOB_COMPLETION_INDEX" in env:
            index = env_int("JOB_COMPLETION_INDEX", "--part")
        else:
            raise ValueError(f"--part {text}: no job-array index in the environment (SLURM_ARRAY_TASK_ID or "
                             "JOB_COMPLETION_INDEX); give it as --part i/N")
        if not count_text:
            raise ValueError(f"--part {text}: the number of parts is not in the environment; give it as "
                             "--part auto/N")
        index_text = str(index)
    try:
        part, parts = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--part {text!r}: expected i/N (e.g. 0/4), auto/N or auto") from None
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"--part {text}: need 0 <= i < N")
    return part, parts


def my_shards(num_shards: int, part: int, parts: int, rank: int, world: int) -> list[int]:
    """The shards a (part, rank) starts with: part i of N owns k % N == i, its ranks take turns."""
    return [k for k in range(num_shards) if k % parts == part][rank::world]


# the statistics of this process's latest teacher pass (kdcache.extraction.PassStats), for the benchmarks
LAST_PASS: dict = {}
