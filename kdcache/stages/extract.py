"""Stage one: run the teacher once over every image into the sharded Zarr cache.

config -> checks -> the teacher (kdcache.extract.teacher) -> the cache (kdcache.extract.output) -> this
process's share of the shards (kdcache.extract.work) through the teacher pass (kdcache.extraction)."""
from __future__ import annotations

import errno
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from kdcache import dist
from kdcache.datasets import create_dataset, list_datasets
from kdcache.extract.output import check_out, creation_lock, open_or_create, repair, restore_array_metadata
from kdcache.extract.rows import check_rows, in_row_order, resolve_rows
from kdcache.extract.teacher import (build_teacher, check_classes, check_mix, check_probe_domains,
                                     check_shard_buffer, check_topk, describe, mix_settings, resolve_topk)
from kdcache.extract.work import my_shards, parse_part
from kdcache.extraction import PassStats, StreamSpec, fit_probe_once, teacher_pass
from kdcache.cache.backend import cache_path
from kdcache.options import ConfigError, check_fields
from kdcache.pack import remove_stale_temporaries
from kdcache.cache.format import CacheError, Layout, RowOrder
from kdcache.cache.store import CacheStore
from kdcache.teachers import attention_kernels
from kdcache.mixing import M
from kdcache.views import PARAMS

from .config import cache_location, local_path, write_yaml
from kdcache.schema import ExtractConfig  # noqa: F401  (stage.ExtractConfig)


@dataclass(frozen=True)
class Extracted:
    """What an extraction gives back: the cache, and the statistics of this process's teacher pass."""

    path: Path
    stats: PassStats


def _check(cfg: ExtractConfig) -> None:
    if not cfg.dataset:
        raise ConfigError(f"--dataset is required: one of {', '.join(list_datasets())} (synthetic: generated "
                         "test images, no folder)")
    cache_location(cfg.out, "--out")
    local_path(cfg.data_root, "--data-root")
    parse_part(cfg.part)
    check_fields(cfg)
    check_mix(cfg)
    check_out(cache_path(cfg.out or f"cache/{cfg.dataset}"))


def run(cfg: ExtractConfig) -> Path:
    """Extract (or resume extracting) the cache described by `cfg`; returns the cache path."""
    return extract(cfg).path


def _open_store(cfg: ExtractConfig, out: Path, layout: Layout, described: tuple, rank: int) -> CacheStore:
    """Rank 0 opens or creates the cache (under the creation lock) and writes the resolved options beside it;
    the other ranks open what it made (holding its rows in the order they read the dataset in), or raise its
    error."""
    error = store = None
    if rank == 0:
        try:
            with creation_lock(out):
                store = open_or_create(out, cfg, layout, *described)
                # the resolved options, beside the cache (not inside the Zarr root; the attributes hold them too)
                write_yaml(cfg, out.with_name(out.name + ".extract.yaml"))
        except CacheError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise CacheError(error)
    if rank == 0:
        return store
    store = CacheStore.open(out, mode="r+")
    check_rows(store, RowOrder(cfg.row_order, cfg.row_seed), out)
    return store


def extract(cfg: ExtractConfig) -> Extracted:
    """Extract (or resume) the cache; returns it with this process's teacher-pass statistics."""
    _check(cfg)
    rank, world = dist.init()
    out = cache_path(cfg.out or f"cache/{cfg.dataset}")
    rows = resolve_rows(cfg, out)
    cfg = replace(cfg, row_order=rows.order, row_seed=rows.seed)
    # row r of the cache holds sample r of this dataset, in every array, tar shard and teacher pass
    dataset = in_row_order(create_dataset(cfg.dataset, cfg.data_root, only_domains=cfg.domains,
                                           **dict(cfg.dataset_options)), rows)
    check_classes(cfg, dataset)
    teacher, head, device, dims = build_teacher(cfg, dataset)
    check_probe_domains(cfg, dataset, head)
    teacher.tune(channels_last=cfg.channels_last, compile_mode=cfg.compile, batch_size=cfg.batch_size)
    unfused = attention_kernels(teacher)["unfused"]
    if unfused and rank == 0:
        print(f"warning: {unfused} attention block(s) of {teacher.name} do not use F.scaled_dot_product_attention "
              "(timm: unset TIMM_FUSED_ATTN=0); extraction is slower on a GPU", file=sys.stderr)
    pre = teacher.preprocess
    classes = len(dataset.classes) if head == "probe" else dims["logits"]
    cfg = replace(cfg, logits_topk=resolve_topk(cfg, out, classes))
    layout = Layout(n=len(dataset), views=cfg.views, feature_dim=dims["features"], num_classes=classes,
                    token_grid=cfg.tokens, token_dim=dims["tokens"], shard_size=cfg.shard_size, params=len(PARAMS),
                    feature_dtype=cfg.feature_dtype, mix_params=M if cfg.mix != "none" else 0,
                    logits_topk=cfg.logits_topk)
    check_topk(cfg, layout)
    check_shard_buffer(layout)
    identity, attrs, static = describe(cfg, dataset, teacher, head, dims)
    if cfg.repair and rank == 0 and (out / "zarr.json").is_file():
        restore_array_metadata(out)  # before the open, which checks every array's metadata
    store = _open_store(cfg, out, layout, (identity, attrs, static), rank)
    if rank == 0:
        remove_stale_temporaries(store.images_dir)
    if cfg.repair and rank == 0:
        repair(store, static)
    if rank == 0 and head == "probe" and store.meta.head_fitted and not store.shard_done().all():
        # shards to (re)compute carry no probe logits yet: fit again (deterministically) once all are done
        store.update_attrs(head_fit={"fitted": False})
    dist.barrier()

    part, parts = parse_part(cfg.part)
    done = store.shard_done()
    mine = [k for k in my_shards(layout.num_shards, part, parts, rank, world) if not done[k]]
    spec = StreamSpec(str(store.images_dir), layout, cfg.image_bound, pre.input_size, pre.interpolation,
                      pre.crop_pct, cfg.view_policy, cfg.view_seed, cfg.batch_size, cfg.decode, mix_settings(cfg))
    try:
        stats = teacher_pass(store, dataset, teacher, spec, mine, workers=cfg.workers, device=device,
                             progress=cfg.progress and rank == 0)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CacheError(f"disk full while writing the cache at {out} ({e}); free some space and run the same "
                             "command again: finished shards are kept, the rest are computed") from None
        raise
    everyone = dist.gather((stats.images, stats.shards, stats.seconds))  # every rank's share, for one line
    images, shards = sum(e[0] for e in everyone), sum(e[1] for e in everyone)
    if rank == 0 and images:
        print(f"extracted {images} images x {layout.views} views in {shards} shard(s) at "
              f"{images / max(max(e[2] for e in everyone), 1e-9):.1f} img/s"
              + (f" ({world} ranks)" if world > 1 else ""), file=sys.stderr)
    dist.barrier()
    if rank == 0:
        fit_probe_once(store)
    return Extracted(out, stats)
