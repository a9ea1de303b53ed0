"""The teacher of an extraction and what the cache records about it: the teacher with its head, the checks
of the dataset and of one shard's memory, and the cache's identity, attributes and static arrays."""
from __future__ import annotations

import dataclasses
import datetime
import re
import sys

import numpy as np

from kdcache import __version__, dist
from kdcache.heads import resolve_head
from kdcache.options import ConfigError, to_dict
from kdcache.cache.format import CacheError, Layout, RowOrder
from kdcache.cache.store import CacheStore
from kdcache.extraction import ShardBuffer
from kdcache.teachers import TeacherError, create_teacher, zeroshot_head
from kdcache.mixing import MAX_MIX_SHARD, MixSettings
from kdcache.views import PARAMS, POLICY_DEFAULTS, REPLAY_VERSION

# One shard's teacher outputs are held in memory (a few shards at once: computing, queued, being written).
MAX_SHARD_BUFFER = 16 * 2**30


def check_classes(cfg, dataset) -> None:
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


def build_teacher(cfg, dataset):
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
                           f"({str(e).strip().rstrip('.')}); {input_size_hint(cfg.teacher, teacher, size)}") from None
    return teacher, head, device, dims


def input_size_hint(name: str, teacher, size: int) -> str:
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


def check_shard_buffer(layout: Layout) -> None:
    """One shard's outputs must fit in memory; checked before the cache is created, so an absurd --views or
    --shard-size leaves nothing behind."""
    nbytes = ShardBuffer.nbytes(layout.shard_size, layout)
    if nbytes > MAX_SHARD_BUFFER:
        raise ConfigError(f"--views {layout.views} with --shard-size {layout.shard_size} needs "
                          f"{nbytes / 2**30:.0f} GiB of memory per shard of teacher outputs (at most "
                          f"{MAX_SHARD_BUFFER // 2**30} GiB); use fewer --views or a smaller --shard-size")


def check_probe_domains(cfg, dataset, head: str) -> None:
    """--probe-domain names domains of the dataset, for a probe head; an error naming the flag."""
    if not cfg.probe_domains:
        return
    if head != "probe":
        raise ConfigError(f"--probe-domain chooses the rows a probe head is fitted on; this cache's head is {head} "
                          "(pass --head probe, or leave --probe-domain out)")
    unknown = [d for d in cfg.probe_domains if d not in dataset.domains]
    if unknown:
        raise ConfigError(f"--probe-domain {', '.join(unknown)}: not a domain of this dataset (it has: "
                          f"{', '.join(dataset.domains)})")


def mix_settings(cfg) -> MixSettings:
    return MixSettings(cfg.mix, float(cfg.mix_prob), float(cfg.mix_alpha))


def check_mix(cfg) -> None:
    """Options that mixed views cannot be made with, and mixing settings given without mixing; an error naming
    the flag."""
    if cfg.mix == "none":
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        unused = [f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in ("mix_prob", "mix_alpha")
                  if getattr(cfg, name) != defaults[name]]
        if unused:
            raise ConfigError(f"{' and '.join(unused)} set how views are mixed, but --mix is none: add --mix "
                              "mixup, cutmix or both, or leave them out")
        return
    if cfg.views < 2:
        raise ConfigError(f"--mix {cfg.mix} mixes the views after view 0 (the clean one, never mixed): it needs "
                          f"--views 2 or more, not --views {cfg.views}")
    if cfg.decode != "workers":
        raise ConfigError(f"--mix {cfg.mix} is replayed by the loader workers: it needs --decode workers, "
                          f"not --decode {cfg.decode}")
    if cfg.shard_size > MAX_MIX_SHARD:
        raise ConfigError(f"--shard-size {cfg.shard_size} is too large for --mix {cfg.mix} (a partner is recorded "
                          f"as a row of its shard: at most {MAX_MIX_SHARD})")


AUTO_TOPK, AUTO_TOPK_CLASSES = 10, 100  # --logits-topk auto: top-10 from 100 classes (study-views.md: top-10
# within the spread of dense at 108 classes for kd, dkd and customkd, at about a fifth of the bytes)


def resolve_topk(cfg, out, num_classes: int) -> int:
    """--logits-topk as given, or auto (None): the K of the cache already at `out`, so that a resume goes on as
    the cache began; for a new cache AUTO_TOPK when the head has AUTO_TOPK_CLASSES classes or more, else dense."""
    if cfg.logits_topk is not None:
        return cfg.logits_topk
    if not cfg.overwrite and (out / "zarr.json").is_file():
        try:
            return CacheStore.open(out).layout.logits_topk
        except CacheError:  # half made, or not a cache of this format: opening it for writing decides
            pass
    return AUTO_TOPK if num_classes >= AUTO_TOPK_CLASSES else 0


def check_topk(cfg, layout: Layout) -> None:
    """--logits-topk K keeps fewer classes than there are (1 <= K <= C - 1), of a head that gives logits."""
    k, c = cfg.logits_topk, layout.num_classes
    if k and not c:
        raise ConfigError(f"--logits-topk {k}: the cache has no logits (--head {cfg.head}); use 0")
    if k and not 1 <= k <= c - 1:
        raise ConfigError(f"--logits-topk {k}: must be between 1 and {c - 1} (the teacher's {c} classes less one; "
                          "0 keeps dense logits)")


def describe(cfg, dataset, teacher, head: str, dims: dict) -> tuple[dict, dict, dict]:
    """(identity, attributes, static arrays) of the cache these options make, from `dataset` in the cache's row
    order (its fingerprint is that of the list as found)."""
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
                  **({"decode": cfg.decode} if cfg.decode != "workers" else {}),
                  **({"mix": mix_settings(cfg).identity()} if cfg.mix != "none" else {})},
        "head": {"kind": head, **({"logits_topk": cfg.logits_topk} if cfg.logits_topk else {}),
                 **({"probe_domains": sorted(cfg.probe_domains)} if cfg.probe_domains else {})},
        "pack": {"image_bound": cfg.image_bound, "shard_size": cfg.shard_size},
        "tokens": {"grid": cfg.tokens, "dim": dims["tokens"]},
        "storage": {"feature_dtype": cfg.feature_dtype},
        "rows": RowOrder(cfg.row_order, cfg.row_seed).as_attrs(),
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
