"""The stage-two stream: tar shards and cache rows, read together, mixed across shards, in a seeded order.

    shard order (shuffled per epoch) -> this rank's shards -> windows of `interleave` shards -> each window's
    draws (rows x repeats) permuted together, one view each (the clean view with a fixed probability, otherwise
    the next of the row's other views, without replacement across epochs) -> chunks of draws -> workers replay
    chunks (replay.replay_shard, shard by shard) -> chunks put back in order -> shuffle buffer -> batches
    (never a last batch of one)

Every batch is a fair sample: a window holds the draws of many shards (enough rows that even a cache whose rows
are sorted by class, or one rank's share of it, gives batches close to an i.i.d. draw), and `epoch_plan` says
which rows a batch will hold without reading an image (`batch_makeup` measures it against an i.i.d. draw).

A rank's batches in an epoch depend only on (seed, epoch, the rank's shards), never on the number of workers:
the plan is made in the main process, the views of a draw depend on its row alone, workers only replay chunks,
and the main process puts the chunks back in order before it mixes and batches them. A run resumed with
another --workers ends where an uninterrupted one does.

The cache is only read here; the teacher never runs.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache.format import CacheError, outputs
from ..cache.store import CacheStore
from ..options import ConfigError
from ..mixing import is_mixed, lam_of, partner_row
from ..pack import member_digest, read_members, shard_name
from ..replay import Unreadable, fresh_views, replay_shard, stored_views

CHUNK_BYTES = 32 << 20  # the replayed images of one chunk (what a worker hands over at a time), about
SAMPLE_KEYS = {"features": "feature"}  # a teacher output's key in a sample (and a batch): its array name otherwise
WINDOW_ROWS = 1 << 16  # rows of the shards mixed together (interleave 0): what a class-sorted cache needs
PICK_BLOCK = 4096  # the shuffle buffer draws its slots this many at a time
CLEAN_SHARE = 0.25  # the default share of a row's training draws that take view 0, the clean one


@dataclass(frozen=True)
class StreamConfig:
    cache: str
    image_size: int
    interpolation: str = "bicubic"
    seed: int = 0
    shuffle_buffer: int = 512
    logits: bool = False
    tokens: bool = False
    clean_only: bool = False  # evaluation: view 0, shard order kept, no shuffle
    features: bool = True  # False: images and labels only (supervised training, evaluation)
    teacher_size: int = 0  # > 0: also the same view replayed at the teacher's input size (online teacher)
    teacher_interpolation: str = "bicubic"
    chunk_size: int = 0  # draws a worker replays at a time (0: about CHUNK_BYTES of images); the stream is the same
    fresh_views: bool = False  # views 1..V-1 drawn anew each epoch (online teacher only: no cached outputs match)
    interleave: int = 0  # shards whose draws are permuted together (0: as many as hold WINDOW_ROWS rows)
    clean_share: float = CLEAN_SHARE  # the share of a row's training draws that take the clean view 0 (V > 1)


ONLINE_VIEWS = ("cached", "fresh")


def epoch_view_seed(seed: int, epoch: int) -> int:
    """The view seed of an epoch's fresh views: one per (run seed, epoch), apart from any cache's view seed."""
    return int(np.random.SeedSequence([seed, epoch, 3]).generate_state(1)[0])


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return [int(k) for k in np.random.default_rng([seed, epoch, 1]).permutation(num_shards)]


def rank_shards(repeats: np.ndarray, shard_size: int, seed: int, epoch: int, rank: int, world: int,
                shuffle: bool = True) -> list[int]:
    """This rank's shards for an epoch (only shards holding rows to stream)."""
    num_shards = (len(repeats) + shard_size - 1) // shard_size
    order = shard_order(num_shards, seed, epoch) if shuffle else list(range(num_shards))
    order = [k for k in order if repeats[k * shard_size:(k + 1) * shard_size].any()]
    return order[rank::world]


def samples_in(shards: list[int], repeats: np.ndarray, shard_size: int) -> int:
    return int(sum(repeats[k * shard_size:(k + 1) * shard_size].sum() for k in shards))


def num_batches(samples: int, batch_size: int) -> int:
    """Batches of an epoch of `samples`: a last single sample joins the batch before it (see `batched`)."""
    full, rest = divmod(samples, batch_size)
    return full if rest == 1 and full and batch_size > 1 else full + (rest > 0)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` items. A last group of one joins the group before it (which then holds
    size + 1): BatchNorm cannot train on a batch of one image."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) == 2 * size:
            yield buf[:size]
            buf = buf[size:]
    if len(buf) == size + 1 and size > 1:
        yield buf
    elif buf:
        yield buf[:size]
        if buf[size:]:
            yield buf[size:]


def window_size(interleave: int, shard_size: int) -> int:
    """Shards per window: `interleave`, or (0) as many as hold WINDOW_ROWS rows."""
    return interleave if interleave > 0 else max(1, WINDOW_ROWS // shard_size)


def shard_rows(repeats: np.ndarray, shard_size: int, k: int) -> np.ndarray:
    """Shard k's draws in row order: a row repeated r times appears r times."""
    start = k * shard_size
    reps = np.maximum(repeats[start:start + shard_size], 0)
    return np.repeat(np.arange(start, start + len(reps), dtype=np.int64), reps)


@dataclass
class EpochPlan:
    """A rank's draws for an epoch, in stream order before the shuffle buffer: `rows[i]` drawn with view
    `views[i]`; window w holds draws windows[w]..windows[w+1]-1."""

    rows: np.ndarray
    views: np.ndarray
    windows: np.ndarray


def epoch_plan(cfg: StreamConfig, shards: list[int], repeats: np.ndarray, shard_size: int, epoch: int,
               num_views: int) -> EpochPlan:
    """Training: the rank's shards cut into windows of `window_size` shards (in the epoch's shard order); each
    window's draws permuted together (seeded by the run's seed, the epoch and the window's shards), so a batch
    holds rows of many shards. Evaluation (clean_only): every row's view 0, in shard and row order."""
    parts = [shard_rows(repeats, shard_size, k) for k in shards]
    if cfg.clean_only:
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return EpochPlan(rows, np.zeros(len(rows), np.int64), np.array([0, len(rows)], np.int64))
    w = window_size(cfg.interleave, shard_size)
    pieces, bounds = [], [0]
    for i in range(0, len(shards), w):
        rows = np.concatenate(parts[i:i + w])
        rng = np.random.default_rng([cfg.seed, epoch, 4, *shards[i:i + w]])
        pieces.append(rows[rng.permutation(len(rows))])
        bounds.append(bounds[-1] + len(rows))
    rows = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    views = draw_views(cfg.seed, rows, np.maximum(repeats, 0)[rows], epoch, num_views, cfg.clean_share)
    return EpochPlan(rows, views, np.asarray(bounds, np.int64))


def draw_views(seed: int, draws: np.ndarray, reps: np.ndarray, epoch: int, num_views: int,
               clean_share: float = CLEAN_SHARE) -> np.ndarray:
    """The view of each draw, a function of the run's seed, the row and the draw's turn (the i-th draw of a row
    drawn r times an epoch is turn epoch * r + i of it) alone: a row's views depend on neither the shard order,
    the ranks, the workers nor where a run was resumed.

    A `clean_share` of a row's turns take the clean view 0, whatever V is, evenly spaced from a phase hashed
    from (seed, row): turn t is clean when floor(phase + (t + 1) * share) passes floor(phase + t * share). The
    other turns walk the row's own permutation of views 1..V-1 (seeded by (seed, row)) in order, so a row's
    other views are drawn without replacement across epochs: E epochs of one draw see min(E', V - 1) distinct
    ones, E' the turns that were not clean. V = 1: every draw is the clean view."""
    if not len(draws) or num_views <= 1:
        return np.zeros(len(draws), np.int64)
    order = np.argsort(draws, kind="stable")  # the i-th draw of a row: its place among the row's draws
    ordered = draws[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    nth = np.empty(len(draws), np.int64)
    nth[order] = np.arange(len(draws)) - np.repeat(starts, np.diff(np.r_[starts, len(draws)]))
    turn = epoch * reps.astype(np.int64) + nth
    key = _mix(_mix(np.full(len(draws), seed & (2 ** 64 - 1), np.uint64) ^ np.uint64(0xC1EA)) ^
               draws.astype(np.uint64))
    phase = (key >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    before = np.floor(phase + turn * clean_share).astype(np.int64)  # clean turns before this one
    clean = np.floor(phase + (turn + 1) * clean_share).astype(np.int64) > before
    place = (turn - before) % (num_views - 1)
    other = 1 + view_permutations(seed, draws, num_views - 1)[np.arange(len(draws)), place]
    return np.where(clean, 0, other)


def view_permutations(seed: int, rows: np.ndarray, num_views: int) -> np.ndarray:
    """[len(rows), V]: each row's permutation of its views, a function of (seed, row) only (the order of V
    hashed keys: vectorised, where a generator per row would cost microseconds each)."""
    base = _mix(_mix(np.full(len(rows), seed & (2 ** 64 - 1), np.uint64)) ^ np.asarray(rows, np.uint64))
    keys = _mix(base[:, None] ^ _mix(np.arange(num_views, dtype=np.uint64))[None, :])
    return np.argsort(keys, axis=1, kind="stable")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit (wraps by design)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffle_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a bounded shuffle buffer of `size` gives out n items, as positions: item i >= size
    swaps with a random slot and the item displaced goes out; what is left goes out in a random order at the
    end. The same draws as `_shuffled`, so `batch_rows` tells the stream's order without an image."""
    out = np.empty(n, np.int64)
    buf = np.arange(min(size, n), dtype=np.int64)
    for j0 in range(0, max(n - size, 0), PICK_BLOCK):
        picks = rng.integers(size, size=PICK_BLOCK)
        for j in range(j0, min(j0 + PICK_BLOCK, n - size)):
            slot = picks[j - j0]
            out[j] = buf[slot]
            buf[slot] = size + j
    out[max(n - size, 0):] = buf[rng.permutation(len(buf))]
    return out


def batch_rows(plan: EpochPlan, cfg: StreamConfig, epoch: int) -> np.ndarray:
    """The rows in the order batches take them (the plan after the shuffle buffer), when every image decodes."""
    if cfg.clean_only or cfg.shuffle_buffer <= 1:
        return plan.rows
    return plan.rows[shuffle_order(len(plan.rows), cfg.shuffle_buffer, _buffer_rng(cfg, epoch))]


def _buffer_rng(cfg: StreamConfig, epoch: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, epoch, 2, 0])


@dataclass
class Makeup:
    """Batch make-up of an epoch: the mean number of classes per batch and the mean largest class share, over
    the batches' rows with a known class; beside them, what i.i.d. batches of the same sizes from the same rows
    give (`iid_*`)."""

    classes: list[int] = field(default_factory=list)
    largest: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    known: list[np.ndarray] = field(default_factory=list)

    def add(self, labels: np.ndarray) -> None:
        labels = labels[labels >= 0]
        if len(labels):
            counts = np.bincount(labels)
            self.classes.append(int((counts > 0).sum()))
            self.largest.append(float(counts.max() / len(labels)))
            self.sizes.append(len(labels))
            self.known.append(labels)

    def summary(self, seed: int = 0, samples: int = 256) -> dict:
        """Means over the batches, and over i.i.d. batches of the same sizes drawn (without replacement, seeded)
        from all the rows the batches held."""
        if not self.sizes:
            return {}
        pool = np.concatenate(self.known)
        rng = np.random.default_rng([seed, 9])
        sizes = np.resize(np.asarray(self.sizes), max(samples, len(self.sizes)))
        iid = [np.bincount(pool[rng.choice(len(pool), n, replace=False)]) for n in sizes]
        return {"batches": len(self.sizes), "classes_per_batch": round(float(np.mean(self.classes)), 2),
                "largest_class_share": round(float(np.mean(self.largest)), 3),
                "iid_classes_per_batch": round(float(np.mean([(c > 0).sum() for c in iid])), 2),
                "iid_largest_class_share": round(float(np.mean([c.max() / n for c, n in zip(iid, sizes)])), 3)}


def makeup_of(rows: np.ndarray, classes: np.ndarray, batch_size: int) -> dict:
    """The make-up of the batches a row order gives (see Makeup), computed without an image."""
    m = Makeup()
    sizes = [len(g) for g in batched(range(len(rows)), batch_size)]
    for start, n in zip(np.cumsum([0] + sizes[:-1]), sizes):
        m.add(classes[rows[start:start + n]])
    return m.summary()


def makeup_problem(summary: dict) -> str | None:
    """Why a batch make-up is far from an i.i.d. draw (fewer than 0.7 of its classes per batch, or a largest
    class share over 1.5 times its and 0.1 above it), or None."""
    if "iid_classes_per_batch" not in summary:
        return None
    c, ic = summary["classes_per_batch"], summary["iid_classes_per_batch"]
    s, is_ = summary["largest_class_share"], summary["iid_largest_class_share"]
    if c < 0.7 * ic or (s > 1.5 * is_ and s > is_ + 0.1):
        return (f"batches hold {c:.1f} classes on average (an i.i.d. draw: {ic:.1f}) and their largest class is "
                f"{100 * s:.0f}% of a batch ({100 * is_:.0f}%)")
    return None


@dataclass(frozen=True)
class Chunk:
    """Draws [start, stop) of the epoch's plan: what a worker replays at a time (never across windows). `index`
    is the chunk's place in the epoch's stream."""

    index: int
    window: int
    start: int
    stop: int


def plan_chunks(plan: EpochPlan, size: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for w in range(len(plan.windows) - 1):
        lo, hi = int(plan.windows[w]), int(plan.windows[w + 1])
        for start in range(lo, hi, size):
            chunks.append(Chunk(len(chunks), w, start, min(start + size, hi)))
    return chunks


@dataclass
class _Shard:
    """What a worker reads of shard k once, for all the chunks of its window that it replays."""

    k: int
    rows: range
    members: dict[int, tuple[str, bytes]]  # the packed rows this worker's chunks need
    problems: list[str]  # of the tar file as a whole (reported by the chunk holding the shard's first draw)
    digests: np.ndarray | None
    arrays: dict[str, np.ndarray]  # view parameters, and the teacher rows asked for


class CacheStream:
    """One rank's stream for an epoch: one dict per draw (image (uint8, replayed view), cached teacher rows,
    label, row, view), in an order that (seed, epoch, shards) alone decide."""

    def __init__(self, cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int):
        self.cfg, self.shards, self.repeats, self.labels, self.epoch = cfg, list(shards), repeats, labels, epoch
        size = cfg.chunk_size or max(64, CHUNK_BYTES // (3 * (cfg.image_size ** 2 + cfg.teacher_size ** 2)))
        layout = CacheStore.open(cfg.cache).layout
        self.shard_size = layout.shard_size
        self.plan = epoch_plan(cfg, self.shards, repeats, self.shard_size, epoch, layout.views)
        self.chunks = plan_chunks(self.plan, size)
        # a row's problems are reported by the chunk holding its first draw, a tar file's by the chunk holding
        # the first draw of its shard: once an epoch, whichever worker replays it
        unique, first = np.unique(self.plan.rows, return_index=True)
        self.first_draw = dict(zip(unique.tolist(), first.tolist()))
        ks, at = np.unique(self.plan.rows // self.shard_size, return_index=True)
        self.shard_first = dict(zip(ks.tolist(), at.tolist()))

    def __iter__(self) -> Iterator[dict]:
        return self.mix(s for _, samples in self.replay(self.chunks) for s in samples)

    def mix(self, items: Iterable) -> Iterator:
        """The shuffle buffer (training): mixes the draws of neighbouring windows."""
        if self.cfg.clean_only or self.cfg.shuffle_buffer <= 1:
            return iter(items)
        return _shuffled(items, self.cfg.shuffle_buffer, _buffer_rng(self.cfg, self.epoch))

    def replay(self, chunks: list[Chunk]) -> Iterator[tuple[Chunk, list[dict]]]:
        """Each chunk with its samples (a draw whose image is damaged is skipped, and reported). The shards of a
        window are read once, when its first chunk comes, keeping the packed rows of `chunks` alone."""
        store = CacheStore.open(self.cfg.cache)
        window, loaded = None, {}
        for chunk in chunks:
            if chunk.window != window:
                window, loaded = chunk.window, {}  # the previous window's shards are let go
                mine = [c for c in chunks if c.window == window]
                wanted = np.unique(np.concatenate([self.plan.rows[c.start:c.stop] for c in mine]))
                for k in np.unique(wanted // self.shard_size).tolist():
                    loaded[k] = self._read(store, k, wanted)
            yield chunk, self._replay_chunk(store, loaded, chunk)

    def _arrays(self) -> list[str]:
        """The view parameters, and the teacher outputs (ARRAYS) asked for: one with a StreamConfig flag of its
        name (features, logits, tokens) when that flag is set, any other with the features."""
        return ["views"] + self._outputs()

    def _outputs(self) -> list[str]:
        cfg = self.cfg
        return [name for name in outputs() if getattr(cfg, name, cfg.features)]

    def _read(self, store: CacheStore, k: int, wanted: np.ndarray) -> _Shard:
        """Shard k's arrays (one chunk-aligned slice each, never a per-sample Zarr read, each compared with its
        recorded digest) and its tar, read sequentially once, keeping the `wanted` rows and their mix partners."""
        rows = store.layout.rows(k)
        try:
            names = self._arrays() + (["mix"] if store.has("mix") else [])
            arrays = {name: store.read_checked(name, k) for name in names}
            mine = wanted[(wanted >= rows.start) & (wanted < rows.stop)]
            keep = set(mine.tolist())
            if "mix" in arrays:
                mix = arrays["mix"]
                keep |= {partner_row(rec, rows.start) for r in mine.tolist() for rec in mix[r - rows.start]
                         if is_mixed(rec)}
            members, problems = read_members(store.images_dir / shard_name(k), rows)
            members = {r: m for r, m in members.items() if r in keep}
            digests = store.read_checked("image_digests", k) if store.has("image_digests") else None
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged shard file raises from its codec or index
            raise CacheError(f"shard {k} of cache {self.cfg.cache} cannot be read ({type(e).__name__}: {e}); check "
                             "it with `info --verify` and fix it with `extract --repair`") from None
        return _Shard(k, rows, members, problems, digests, arrays)

    def _replay_chunk(self, store: CacheStore, loaded: dict[int, _Shard], chunk: Chunk) -> list[dict]:
        """The chunk's samples in its draws' order, replayed shard by shard."""
        rows = self.plan.rows[chunk.start:chunk.stop]
        views = self.plan.views[chunk.start:chunk.stop]
        shard_of = rows // self.shard_size
        at: dict[int, list[dict]] = {}
        for k in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == k)
            for place, sample in self._replay(store, loaded[k], chunk, rows[where].tolist(), views[where].tolist(),
                                              where.tolist()):
                at.setdefault(place, []).append(sample)
        return [s for place in sorted(at) for s in at[place]]

    def _replay(self, store: CacheStore, shard: _Shard, chunk: Chunk, draws: list[int], views: list[int],
                places: list[int]) -> Iterator[tuple[int, dict]]:
        """(place in the chunk, sample) for the chunk's draws of one shard."""
        cfg, rows = self.cfg, shard.rows
        own = {r for r in draws if chunk.start <= self.first_draw[r] < chunk.stop}  # rows first drawn here
        mix = shard.arrays.get("mix")
        partners = set() if mix is None else \
            {partner_row(mix[r - rows.start, v], rows.start) for r, v in zip(draws, views)
             if is_mixed(mix[r - rows.start, v])}
        packed = self._packed(shard, sorted(set(draws) | partners), own,
                              chunk.start <= self.shard_first.get(shard.k, -1) < chunk.stop)
        outputs = [(cfg.image_size, cfg.interpolation)]
        if cfg.teacher_size:
            outputs.append((cfg.teacher_size, cfg.teacher_interpolation))
        picks = [(r, v, p) for r, v, p in zip(draws, views, places) if r in packed]
        teacher = {SAMPLE_KEYS.get(name, name): shard.arrays[name] for name in self._outputs()}
        got_all = replay_shard(packed, [(r, v) for r, v, _ in picks], self._views_of(store, shard), outputs,
                               store.meta.image_bound, None if mix is None else lambda r: mix[r - rows.start],
                               rows.start)
        queue = iter(picks)
        for got in got_all:
            if isinstance(got, Unreadable):
                if got.row in own:
                    _report(shard.k, [f"row {got.row}: {got.reason}"])
                continue
            # replay_shard yields the picks in order, skipping those it cannot replay
            place = next(p for r, v, p in queue if r == got.row and v == got.view)
            row, v, j = got.row, got.view, got.row - rows.start
            sample = {"image": got.images[0], "label": int(self.labels[row]), "row": row, "view": v}
            if cfg.teacher_size:
                sample["teacher_image"] = got.images[1]
            for key, values in teacher.items():
                sample[key] = torch.from_numpy(values[j, v].astype(np.float32))
            if mix is not None:
                sample.update(mix_sample(mix[j, v], self.labels, rows.start))
            yield place, sample

    def _views_of(self, store: CacheStore, shard: _Shard):
        """The views replayed: the cache's, or (fresh_views) new ones from its view policy, keyed by the epoch."""
        if not self.cfg.fresh_views:
            return stored_views(shard.arrays["views"], shard.rows.start)
        views, preprocess = store.meta.section("views"), store.meta.section("teacher")["preprocess"]
        return fresh_views(store.layout.views, views["policy"], float(preprocess["crop_pct"]),
                           epoch_view_seed(self.cfg.seed, self.epoch))

    @staticmethod
    def _packed(shard: _Shard, wanted: list[int], own: set[int], first_chunk: bool) -> dict[int, bytes]:
        """The packed bytes of the `wanted` rows. Each member is checked against the digest taken when it was
        packed; a damaged, swapped or missing member is skipped and reported (for the rows in `own`), never
        decoded."""
        packed, wrong, missing = {}, 0, 0
        for row in wanted:
            if row not in shard.members:
                missing += row in own
                continue
            ext, data = shard.members[row]
            if shard.digests is not None and member_digest(ext, data) != bytes(shard.digests[row - shard.rows.start]):
                wrong += row in own
            elif ext != "bad":
                packed[row] = data
        problems = list(shard.problems) if first_chunk else []
        if wrong:
            problems.append(f"{wrong} member(s) differ from their recorded digest")
        if missing:
            problems.append(f"{missing} row(s) to stream have no member")
        if problems:
            _report(shard.k, problems)
        return packed


def mix_sample(record: np.ndarray, labels: np.ndarray, first: int) -> dict:
    """What a sample of a cache with mixed views carries for the label term: `mix_lam`, the weight of the row's
    own label (1 when the view is not mixed), and `mix_label`, the partner's label (-1 when the view is not mixed
    or the partner is unlabelled in the scenario)."""
    mixed = is_mixed(record)
    return {"mix_lam": torch.tensor(lam_of(record), dtype=torch.float32),
            "mix_label": int(labels[partner_row(record, first)]) if mixed else -1}


def _report(k: int, problems: list[str]) -> None:
    """Damaged packed images are skipped, and said so (once per problem and epoch, on stderr)."""
    print(f"warning: shard {k} packed images: {'; '.join(problems)}; those rows are skipped "
          "(check with `python cli.py info --cache CACHE --verify`, fix with `extract --repair`)",
          file=sys.stderr)


def _shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """A bounded shuffle buffer (`shuffle_order` gives the same order as positions)."""
    buf: list = []
    picks = np.zeros(0, np.int64)
    j = 0
    for s in items:
        if len(buf) < size:
            buf.append(s)
            continue
        if j == len(picks):
            picks, j = rng.integers(size, size=PICK_BLOCK), 0
        i = int(picks[j])
        j += 1
        buf[i], s = s, buf[i]
        yield s
    order = rng.permutation(len(buf))
    for i in order:
        yield buf[i]


class _Chunks(IterableDataset):
    """A worker's share of a stream's chunks (every nw-th), each as (index, its samples stacked into tensors,
    or None when it has none)."""

    def __init__(self, stream: CacheStream):
        self.stream = stream

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        for chunk, samples in self.stream.replay(self.stream.chunks[wid::nw]):
            yield chunk.index, _stack(samples) if samples else None


def _stack(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) if isinstance(value, torch.Tensor)
            else torch.tensor([s[key] for s in samples], dtype=torch.int64) for key, value in samples[0].items()}


def _in_order(items: Iterable[tuple[int, dict | None]]) -> Iterator[dict]:
    """Chunks by their index, whichever worker replayed them (one that arrives early waits for its turn)."""
    waiting: dict[int, dict | None] = {}
    want = 0
    for index, chunk in items:
        waiting[index] = chunk
        while want in waiting:
            chunk = waiting.pop(want)
            want += 1
            if chunk is not None:
                yield chunk


def _collate(refs: list[tuple[dict, int]], pin_memory: bool) -> dict[str, torch.Tensor]:
    """One batch from (chunk, position) references."""
    batch = {}
    for key in refs[0][0]:
        values = [chunk[key][i] for chunk, i in refs]
        out = torch.empty((len(values), *values[0].shape), dtype=values[0].dtype, pin_memory=pin_memory)
        batch[key] = torch.stack(values, out=out)
    return batch


class StreamLoader:
    """The batches of a stream. Workers replay chunks; the main process puts them back in order, mixes and
    batches them: the batches are the same for any number of workers. With `classes` (each row's class, -1
    unknown), the batches' make-up is measured as they go out (`makeup()`, after the pass)."""

    def __init__(self, stream: CacheStream, batch_size: int, workers: int, pin_memory: bool = False,
                 classes: np.ndarray | None = None):
        self.stream, self.batch_size, self.workers, self.pin_memory = stream, batch_size, workers, pin_memory
        self.classes, self._makeup = classes, Makeup()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        workers = min(self.workers, len(self.stream.chunks))
        # a DataLoader even without workers: each pass draws one seed from torch's generator, whatever the workers
        chunks = DataLoader(_Chunks(self.stream), batch_size=None, num_workers=workers,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        refs = ((chunk, i) for chunk in _in_order(chunks) for i in range(len(chunk["row"])))
        self._makeup = Makeup()
        for group in batched(self.stream.mix(refs), self.batch_size):
            batch = _collate(group, self.pin_memory)
            if self.classes is not None:
                self._makeup.add(self.classes[batch["row"].numpy()])
            yield batch

    def makeup(self) -> dict:
        """The last pass's batch make-up beside an i.i.d. draw of the same rows (see Makeup); {} unmeasured."""
        return self._makeup.summary(self.stream.cfg.seed) if self.classes is not None else {}


def make_loader(cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int,
                batch_size: int, workers: int, pin_memory: bool = False,
                classes: np.ndarray | None = None) -> StreamLoader:
    return StreamLoader(CacheStream(cfg, shards, repeats, labels, epoch), batch_size, workers, pin_memory, classes)


def labelled_repeats(labelled: np.ndarray, unlabelled: np.ndarray, ratio: float | None) -> np.ndarray:
    """Per-row repeat counts for one epoch: 1 per row; labelled rows repeated so that at least a
    `ratio` fraction of the samples is labelled.

    ratio None or 0 keeps the natural mix (every sample exactly once per epoch). With no unlabelled
    rows to use (the supervised baseline), labelled rows fill the epoch alone.
    """
    reps = (labelled | unlabelled).astype(np.int32)
    n_l, n_u = int(labelled.sum()), int(unlabelled.sum())
    if ratio and n_l and n_u:
        if not 0 < ratio < 1:
            raise ConfigError("--labelled-ratio must be between 0 and 1")
        if n_l / (n_l + n_u) < ratio:
            reps[labelled] = max(1, int(round(ratio / (1 - ratio) * n_u / n_l)))
    return reps
