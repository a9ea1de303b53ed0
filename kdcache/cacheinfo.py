"""Summaries and integrity checks of a cache (what `cli.py info` prints)."""
from __future__ import annotations

import numpy as np

from .codes import Status
from .images import BadImage, decode_packed
from .pack import member_digest, read_members, shard_name
from .progress import bar
from .cache.format import SPARSE_LOGITS, outputs, quantised
from .cache.integrity import (digest_problems, missing_files, shard_checksum, shard_digest, static_changed,
                              status_changed)
from .cache.sparse import nbytes_per_view
from .cache.store import CacheStore

IMAGES = "packed images: "  # prefix of a problem in a shard's tar file (repair re-packs it)


def summarize(store: CacheStore, max_bad: int = 20) -> dict:
    lay, meta = store.layout, store.meta
    status = store.status()
    shard_done = store.shard_done(status)
    bad_rows = np.flatnonzero(status == Status.BAD)
    bad = []
    for i in bad_rows[:max_bad]:
        entry = {"row": int(i)}
        for name in ("key", "reason"):
            try:
                entry[name] = str(store.text(name + "s", int(i), int(i) + 1)[0])
            except Exception as e:  # noqa: BLE001 - summarize a damaged cache too (verify names the damage)
                entry[name] = f"<unreadable: {type(e).__name__}>"
        bad.append(entry)
    done_rows = int((status == Status.DONE).sum())
    per_view = {}
    for name in outputs():
        if store.has(name):
            scale = quantised().get(name)
            size = store.nbytes_on_disk(name) + (store.nbytes_on_disk(scale) if scale else 0)
            per_view[name] = size / max(done_rows * lay.views, 1)
    if lay.logits_topk:  # the sparse logits' arrays together
        per_view["logits"] = sum(store.nbytes_on_disk(n) for n in SPARSE_LOGITS) / max(done_rows * lay.views, 1)
    # before compression: float16 features, and the logits as stored (dense float16, or the top-K arrays)
    raw = 2 * lay.feature_dim + (nbytes_per_view(lay.logits_topk, lay.num_classes) if lay.logits_topk
                                 else 2 * lay.num_classes)
    return {
        "path": str(store.path),
        "teacher": meta.section("teacher"),
        "dataset": {k: meta.section("dataset")[k] for k in ("name", "N", "fingerprint")}
        | {"classes": len(meta.classes), "domains": list(meta.domains), "root": meta.section("dataset_root")},
        "row_order": meta.rows.as_attrs(),  # a cache that records no order holds the dataset's sorted order
        "views": meta.section("views"),
        "head": meta.section("head") | (meta.section("head_fit") or {}),
        "tokens": meta.section("tokens"),
        "storage": meta.section("storage") or {"feature_dtype": lay.feature_dtype},
        "shards": {"total": lay.num_shards, "done": int(shard_done.sum()), "shard_size": lay.shard_size},
        "rows": {"done": done_rows, "bad": len(bad_rows), "todo": int((status == 0).sum())},
        "complete": bool(shard_done.all()) and store.meta.head_fitted,
        "head_fitted": store.meta.head_fitted,
        "bad_inputs": bad,
        "bytes_per_view": per_view | {"features+logits raw fp16": raw},
    }


def image_problems(store: CacheStore, k: int, status: np.ndarray, digests: np.ndarray | None,
                   decode: bool = False) -> str | None:
    """What is wrong with shard k's tar file, or None. With recorded digests (checksums v2) every member
    is compared with the digest taken when it was packed; without them (older caches) the members are
    checked by name and row, and decoded when `decode`."""
    rows = store.layout.rows(k)
    found, problems = read_members(store.images_dir / shard_name(k), rows)
    missing = [r for r in rows if r not in found]
    if missing:
        problems.append(f"{len(missing)} row(s) have no member (first: row {missing[0]})")
    wrong = []
    for row, (ext, data) in sorted(found.items()):
        j = row - rows.start
        if digests is not None:
            if member_digest(ext, data) != bytes(digests[j]):
                wrong.append(row)
        elif (ext == "bad") != (status[row] == Status.BAD):
            wrong.append(row)
        elif decode and ext != "bad":
            try:
                decode_packed(data, store.meta.image_bound)
            except BadImage:
                wrong.append(row)
    if wrong:
        problems.append(f"{len(wrong)} member(s) differ from what was packed (first: row {wrong[0]})")
    return IMAGES + "; ".join(problems) if problems else None


CHECKSUM_RECORD = "recorded checksum: "  # prefix of a damaged shard_checksums entry (repair rewrites it from the data)
DIGEST_RECORD = "recorded array digests: "  # prefix of a damaged array_digests entry (repair rewrites them)


def damaged_shards(store: CacheStore, progress: bool = False) -> dict[int, str]:
    """Read back every done shard; {shard: problem} for those that do not match their recorded checksum,
    cannot be read, hold non-finite values, or whose packed images differ from what was packed; and for those
    whose data is intact but one of its two records (the shard checksum, the array digests) is damaged: the
    data must then match the other record exactly, and the problem starts with CHECKSUM_RECORD or
    DIGEST_RECORD. `progress`: a bar on a terminal (silent elsewhere, as every bar)."""
    lay = store.layout
    status = store.status()
    done = store.shard_done(status)
    digests = store.has("array_digests")
    problems: dict[int, str] = {}
    shards = [k for k in range(lay.num_shards) if done[k]]
    for k in bar(len(shards), "shard", "verify", enabled=progress, iterable=shards):
        try:
            data = store.read_shard(k)
        except Exception as e:  # a damaged shard file raises from the codec or the shard index
            problems[k] = f"cannot be read ({type(e).__name__}: {e})"
            continue
        checksum = store.read_record("shard_checksums", k)
        checksum = None if checksum is None else str(store._logical("shard_checksums", checksum[None])[0])
        recorded = store.read_record("array_digests", k) if digests else None
        why = _arrays_problem(store, k, data, status, checksum, recorded, digests)
        why = why or image_problems(store, k, status, data.get("image_digests"), decode=store.checksum_version < 2)
        if why:
            problems[k] = why
    return problems


def _arrays_problem(store: CacheStore, k: int, data: dict, status: np.ndarray, checksum: str | None,
                    digests: np.ndarray | None, has_digests: bool) -> str | None:
    """What is wrong with the arrays of done shard k (read as `data`), or None. `checksum` and `digests` are the
    shard's two records (None: unreadable; `has_digests`: the cache keeps digests). Data that matches one intact
    record while the other differs or cannot be read is intact: the other record is what is damaged. While a
    probe head is not fitted its logits are placeholders that the fit rewrites, and a fit that stopped half-way
    leaves them (and the records covering them) changed: that is not damage, the same extract command rewrites
    them (and records are then not judged)."""
    r = store.layout.rows(k)
    pending = store.probe_pending()
    placeholders = {"logits", *SPARSE_LOGITS} if pending else set()
    sums_ok = checksum is not None and checksum == shard_checksum(store, data, status[r.start:r.stop])
    if not has_digests:
        if not sums_ok:
            return "contents differ from the checksum recorded when it was written" if checksum is not None \
                else "its recorded checksum (shard_checksums) cannot be read"
    else:
        wrong = None if digests is None else \
            set(digest_problems(dict(data, status=status[r.start:r.stop]), digests, store.layout)) - placeholders
        if wrong is None and not sums_ok:
            return "contents cannot be checked: its array digests cannot be read and it differs from its checksum"
        if wrong and not sums_ok:
            return "contents differ from the checksum recorded when it was written"
        if not pending:
            if wrong is None or wrong:
                what = "cannot be read" if wrong is None else f"of {', '.join(sorted(wrong))} differ from the data"
                return (DIGEST_RECORD + f"the array digests {what}, while the data matches the shard checksum "
                        "(array_digests damaged)")
            if not sums_ok:
                what = "cannot be read" if checksum is None else "differs from the data"
                return (CHECKSUM_RECORD + f"the shard checksum {what}, while the data matches every array digest "
                        "(shard_checksums damaged)")
    ok_rows = status[r.start:r.stop] == Status.DONE
    for name in (*outputs(), *SPARSE_LOGITS):
        if name in data and name not in placeholders and not np.isfinite(data[name][ok_rows].astype(np.float32)).all():
            return f"non-finite values in {name}"
    return None


def head_problems(store: CacheStore) -> list[str]:
    """The extract probe head: fitted, present, and equal to the digest recorded when it was fitted."""
    if not store.meta.head_fitted:
        return ["head: the probe head was never fitted (it is fitted once every shard is done; the extraction "
                "stopped before or while fitting it): run the same extract command again to fit it"]
    lost = store.meta.probe_missing(store.group)
    if lost:
        return [f"head: the fitted probe head's {lost} is missing or damaged; run extract with --repair to refit it"]
    if store.meta.head_digest:
        try:
            g = store.group["heads/extract"]
            now = shard_digest({n: g[n][:] for n in ("weight", "bias", "fitted_on")})
        except Exception as e:  # noqa: BLE001 - damaged files of the head
            now = f"unreadable ({type(e).__name__})"
        if now != store.meta.head_digest:
            return ["head: the probe head (heads/extract) differs from the digest recorded when it was fitted; "
                    "run extract with --repair to refit it"]
    return []


def cache_problems(store: CacheStore, read_keys: bool = True) -> list[str]:
    """Problems of the cache as a whole (not of one shard): the head, unreadable or changed status, missing
    shard files, static arrays that differ from their recorded digests."""
    status, unreadable = store.status_report()  # read once, for every check below
    todo = int((~store.shard_done(status)).sum())
    out = [f"incomplete: {todo} of {store.layout.num_shards} shard(s) are not extracted yet (an extraction "
           "stopped, or is still running): run the same extract command again to finish it (--repair is for "
           "damage)"] if todo else []
    out += head_problems(store)
    if unreadable:
        out.append(f"status: shard(s) {', '.join(map(str, unreadable[:8]))} cannot be read (they count as "
                   "todo: the extract command recomputes them)")
    changed = status_changed(store, status)
    if changed:
        out.append(f"status: shard(s) {', '.join(map(str, changed[:8]))} differ from the status recorded when written; "
                   "run extract with --repair")
    missing = missing_files(store, status)
    if missing:
        out.append(f"files: {len(missing)} shard file(s) of done shards are missing (first: {missing[0][0]} of shard {missing[0][1]}); "
                   "run extract with --repair")
    changed = static_changed(store, read_keys)
    if changed:
        out.append(f"static arrays: {', '.join(changed)} differ from the digest recorded at creation; run "
                   "extract with --repair (it rewrites them from the dataset)")
    return out


def extract_command(store: CacheStore, **given) -> str:
    """The extract command of this cache, for the cache where it was opened (a copy or a moved cache is fixed
    where it is, not where it was made): its recorded options, --out the opened path; `given` changes some."""
    import shlex

    from .options import command_line
    from .schema import STAGES

    recorded = store.meta.extract_config
    if not recorded:  # a cache made before its options were recorded
        return "python cli.py extract ... --out " + shlex.quote(str(store.path))
    once = {"overwrite": False, "repair": False, "part": None}  # how it was run once, not what the cache is
    return command_line("extract", STAGES["extract"], recorded, **dict(once, **given), out=str(store.path))


def verify(store: CacheStore, progress: bool = False) -> list[str]:
    """Every problem of the cache, each with what fixes it."""
    damaged = damaged_shards(store, progress)
    records = sum(why.startswith((CHECKSUM_RECORD, DIGEST_RECORD)) for why in damaged.values())
    work = ([f"recomputes exactly the {len(damaged) - records} damaged shard(s) named here"]
            if len(damaged) > records else []) + \
        ([f"writes the {records} damaged record(s) named here again from their intact data"] if records else [])
    fix = [f"fix: run the extract command with --repair ({extract_command(store, repair=True)}): it "
           f"{' and '.join(work)}"] if damaged else []
    return cache_problems(store) + [f"shard {k}: {why}" for k, why in sorted(damaged.items())] + fix
