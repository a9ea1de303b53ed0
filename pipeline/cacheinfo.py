"""Summaries and integrity checks of a cache (what `cli.py info` prints)."""
from __future__ import annotations

import numpy as np

from .store import QUANTISED, STATUS_BAD, STATUS_DONE, CacheStore, shard_digest


def summarize(store: CacheStore, max_bad: int = 20) -> dict:
    lay = store.layout
    a = store.attrs
    status = store.status()
    shard_done = store.shard_done(status)
    bad_rows = np.flatnonzero(status == STATUS_BAD)
    keys = store.array("keys")
    reasons = store.array("reasons")
    bad = [{"row": int(i), "key": str(keys[int(i)]), "reason": str(reasons[int(i)])} for i in bad_rows[:max_bad]]
    done_rows = int((status == STATUS_DONE).sum())
    per_view = {}
    for name in ("features", "logits", "tokens"):
        if store.has(name):
            scale = QUANTISED.get(name)
            size = store.nbytes_on_disk(name) + (store.nbytes_on_disk(scale) if scale else 0)
            per_view[name] = size / max(done_rows * lay.views, 1)
    raw = 2 * (lay.feature_dim + lay.num_classes)
    return {
        "path": str(store.path),
        "teacher": a["teacher"],
        "dataset": {k: a["dataset"][k] for k in ("name", "N", "fingerprint")}
        | {"classes": len(a["dataset"]["classes"]), "domains": a["dataset"]["domains"], "root": a.get("dataset_root")},
        "views": a["views"],
        "head": a["head"] | a.get("head_fit", {}),
        "tokens": a["tokens"],
        "storage": a.get("storage") or {"feature_dtype": lay.feature_dtype},
        "shards": {"total": lay.num_shards, "done": int(shard_done.sum()), "shard_size": lay.shard_size},
        "rows": {"done": done_rows, "bad": int(len(bad_rows)), "todo": int((status == 0).sum())},
        "complete": bool(shard_done.all()),
        "bad_inputs": bad,
        "bytes_per_view": per_view | {"features+logits raw fp16": raw},
    }


def damaged_shards(store: CacheStore, progress=None) -> dict[int, str]:
    """Read back every done shard; {shard: problem} for those that do not match their recorded checksum,
    cannot be read, or hold non-finite values."""
    lay = store.layout
    status = store.status()
    done = store.shard_done(status)
    checksums = store.array("shard_checksums")[:]
    problems: dict[int, str] = {}
    shards = [k for k in range(lay.num_shards) if done[k]]
    for k in (progress(shards) if progress else shards):
        try:
            data = store.read_shard(k)
        except Exception as e:  # a damaged shard file raises from the codec or the shard index
            problems[k] = f"cannot be read ({type(e).__name__}: {e})"
            continue
        if str(checksums[k]) != shard_digest(data):
            problems[k] = "contents differ from the checksum recorded when it was written"
            continue
        ok_rows = status[lay.rows(k).start:lay.rows(k).stop] == STATUS_DONE
        for name in ("features", "logits", "tokens"):
            if name in data and not np.isfinite(data[name][ok_rows].astype(np.float32)).all():
                problems[k] = f"non-finite values in {name}"
    return problems


def verify(store: CacheStore, progress=None) -> list[str]:
    return [f"shard {k}: {why}" for k, why in sorted(damaged_shards(store, progress).items())]
