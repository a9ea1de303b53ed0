"""The stage-two stream: tar shard k and cache rows of shard k, read together, in order.

    shard order (shuffled per epoch) -> this rank's shards -> each shard's draws (rows x repeats, in a
    seeded order, one view each: a row's views without replacement across epochs) -> chunks of draws
    -> workers replay chunks (replay.replay_shard) -> chunks put back in order -> shuffle buffer -> batches
    (never a last batch of one)

A rank's batches in an epoch depend only on (seed, epoch, the rank's shards), never on the number of
workers: the draws are seeded per shard and epoch, their views per row, workers only replay chunks, and the
main process puts the chunks back in order before it mixes and batches them. A run resumed with
another --workers ends where an uninterrupted one does.

The cache is only read here; the teacher never runs.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache.format import CacheError, outputs
from ..cache.store import CacheStore
from ..mixing import is_mixed, lam_of, partner_row
from ..pack import member_digest, read_members, shard_name
from ..replay import Unreadable, fresh_views, replay_shard, stored_views

CHUNK_BYTES = 32 << 20  # the replayed images of one chunk (what a worker hands over at a time), about
SAMPLE_KEYS = {"features": "feature"}  # a teacher output's key in a sample (and a batch): its array name otherwise


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


def shard_draws(cfg: StreamConfig, repeats: np.ndarray, rows: range, epoch: int, k: int,
                num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard k's draws in an epoch, (row, view) as two arrays: a row repeated r times is drawn r times.
    Training visits the draws in a seeded random order (so repeats never arrive back to back), each row's
    views drawn without replacement across epochs (`draw_views`); evaluation visits every row's view 0 (the
    clean one) in row order."""
    reps = np.maximum(repeats[rows.start:rows.stop], 0)
    draws = np.repeat(np.arange(rows.start, rows.stop, dtype=np.int64), reps)
    if cfg.clean_only:
        return draws, np.zeros(len(draws), np.int64)
    draws = draws[np.random.default_rng([cfg.seed, epoch, 3, k]).permutation(len(draws))]
    return draws, draw_views(cfg.seed, draws, reps[draws - rows.start], epoch, num_views)


def draw_views(seed: int, draws: np.ndarray, reps: np.ndarray, epoch: int, num_views: int) -> np.ndarray:
    """The view of each draw. Each row walks its own permutation of its views, seeded by (seed, row) alone:
    the i-th draw of a row drawn r times an epoch takes place (epoch * r + i) mod V of it, so E epochs of
    one draw each see min(E, V) distinct views, and a row's views depend on neither the shard order, the
    ranks, the workers nor where a run was resumed."""
    if not len(draws):
        return np.zeros(0, np.int64)
    order = np.argsort(draws, kind="stable")  # the i-th draw of a row: its place among the row's draws
    ordered = draws[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    nth = np.empty(len(draws), np.int64)
    nth[order] = np.arange(len(draws)) - np.repeat(starts, np.diff(np.r_[starts, len(draws)]))
    place = (epoch * reps.astype(np.int64) + nth) % num_views
    return view_permutations(seed, draws, num_views)[np.arange(len(draws)), place]


def view_permutations(seed: int, rows: np.ndarray, num_views: int) -> np.ndarray:
    """[len(rows), V]: each row's permutation of its views, a function of (seed, row) only (the order of V
    hashed keys: vectorised, where a generator per row would cost microseconds each)."""
    base = _mix(_mix(np.full(len(rows), seed & (2 ** 64 - 1), np.uint64)) ^ np.asarray(rows, np.uint64))
    keys = _mix(base[:, None] ^ _mix(np.arange(num_views, dtype=np.uint64))[None, :])
    return np.argsort(keys, axis=1, kind="stable")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit (wraps by design)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Chunk:
    """Draws [start, stop) of shard `shard`'s draws: what a worker replays at a time. `index` is the
    chunk's place in the epoch's stream."""

    index: int
    shard: int
    start: int
    stop: int


def plan_chunks(shards: list[int], repeats: np.ndarray, shard_size: int, size: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for k in shards:
        draws = int(np.maximum(repeats[k * shard_size:(k + 1) * shard_size], 0).sum())
        for start in range(0, draws, size):
            chunks.append(Chunk(len(chunks), k, start, min(start + size, draws)))
    return chunks


@dataclass
class _Shard:
    """What a worker reads of shard k once, for all the chunks of it that it replays."""

    k: int
    rows: range
    draws: np.ndarray  # the epoch's draws (rows), in order
    views: np.ndarray  # the view of each draw
    first: dict[int, int]  # row -> its first draw: a row's problems are reported by the chunk holding it
    members: dict[int, tuple[str, bytes]]
    problems: list[str]  # of the tar file as a whole (reported by the shard's first chunk)
    digests: np.ndarray | None
    arrays: dict[str, np.ndarray]  # view parameters, and the teacher rows asked for


class CacheStream:
    """One rank's stream for an epoch: one dict per draw (image (uint8, replayed view), cached teacher rows,
    label, row, view), in an order that (seed, epoch, shards) alone decide."""

    def __init__(self, cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int):
        self.cfg, self.shards, self.repeats, self.labels, self.epoch = cfg, list(shards), repeats, labels, epoch
        size = cfg.chunk_size or max(64, CHUNK_BYTES // (3 * (cfg.image_size ** 2 + cfg.teacher_size ** 2)))
        self.chunks = plan_chunks(self.shards, repeats, CacheStore.open(cfg.cache).layout.shard_size, size)

    def __iter__(self) -> Iterator[dict]:
        return self.mix(s for _, samples in self.replay(self.chunks) for s in samples)

    def mix(self, items: Iterable) -> Iterator:
        """The shuffle buffer (training): mixes the draws of neighbouring shards."""
        if self.cfg.clean_only or self.cfg.shuffle_buffer <= 1:
            return iter(items)
        return _shuffled(items, self.cfg.shuffle_buffer, np.random.default_rng([self.cfg.seed, self.epoch, 2, 0]))

    def replay(self, chunks: list[Chunk]) -> Iterator[tuple[Chunk, list[dict]]]:
        """Each chunk with its samples (a draw whose image is damaged is skipped, and reported)."""
        store = CacheStore.open(self.cfg.cache)
        shard = None
        for chunk in chunks:
            if shard is None or shard.k != chunk.shard:
                shard = self._read(store, chunk.shard)
            yield chunk, list(self._replay(store, shard, chunk))

    def _arrays(self) -> list[str]:
        """The view parameters, and the teacher outputs (ARRAYS) asked for: one with a StreamConfig flag of its
        name (features, logits, tokens) when that flag is set, any other with the features."""
        return ["views"] + self._outputs()

    def _outputs(self) -> list[str]:
        cfg = self.cfg
        return [name for name in outputs() if getattr(cfg, name, cfg.features)]

    def _read(self, store: CacheStore, k: int) -> _Shard:
        """Shard k's arrays (one chunk-aligned slice each, never a per-sample Zarr read, each compared with its
        recorded digest) and its tar, read sequentially once."""
        rows = store.layout.rows(k)
        try:
            names = self._arrays() + (["mix"] if store.has("mix") else [])
            arrays = {name: store.read_checked(name, k) for name in names}
            members, problems = read_members(store.images_dir / shard_name(k), rows)
            digests = store.read_checked("image_digests", k) if store.has("image_digests") else None
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged shard file raises from its codec or index
            raise CacheError(f"shard {k} of cache {self.cfg.cache} cannot be read ({type(e).__name__}: {e}); check "
                             "it with `info --verify` and fix it with `extract --repair`") from None
        draws, views = shard_draws(self.cfg, self.repeats, rows, self.epoch, k, arrays["views"].shape[1])
        unique, first = np.unique(draws, return_index=True)
        return _Shard(k, rows, draws, views, dict(zip(unique.tolist(), first.tolist())), members, problems, digests,
                      arrays)

    def _replay(self, store: CacheStore, shard: _Shard, chunk: Chunk) -> Iterator[dict]:
        cfg, rows = self.cfg, shard.rows
        draws = shard.draws[chunk.start:chunk.stop].tolist()
        views = shard.views[chunk.start:chunk.stop].tolist()
        own = {r for r in draws if shard.first[r] >= chunk.start}  # rows first drawn in this chunk
        mix = shard.arrays.get("mix")
        partners = set() if mix is None else \
            {partner_row(mix[r - rows.start, v], rows.start) for r, v in zip(draws, views)
             if is_mixed(mix[r - rows.start, v])}
        packed = self._packed(shard, sorted(set(draws) | partners), own, chunk.start == 0)
        outputs = [(cfg.image_size, cfg.interpolation)]
        if cfg.teacher_size:
            outputs.append((cfg.teacher_size, cfg.teacher_interpolation))
        picks = [(r, v) for r, v in zip(draws, views) if r in packed]
        teacher = {SAMPLE_KEYS.get(name, name): shard.arrays[name] for name in self._outputs()}
        for got in replay_shard(packed, picks, self._views_of(store, shard), outputs,
                                store.meta.image_bound, None if mix is None else lambda r: mix[r - rows.start],
                                rows.start):
            if isinstance(got, Unreadable):
                if got.row in own:
                    _report(shard.k, [f"row {got.row}: {got.reason}"])
                continue
            row, v, j = got.row, got.view, got.row - rows.start
            sample = {"image": got.images[0], "label": int(self.labels[row]), "row": row, "view": v}
            if cfg.teacher_size:
                sample["teacher_image"] = got.images[1]
            for key, values in teacher.items():
                sample[key] = torch.from_numpy(values[j, v].astype(np.float32))
            if mix is not None:
                sample.update(mix_sample(mix[j, v], self.labels, rows.start))
            yield sample

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
    """A bounded shuffle buffer."""
    buf = []
    for s in items:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
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
    batches them: the batches are the same for any number of workers."""

    def __init__(self, stream: CacheStream, batch_size: int, workers: int, pin_memory: bool = False):
        self.stream, self.batch_size, self.workers, self.pin_memory = stream, batch_size, workers, pin_memory

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        workers = min(self.workers, len(self.stream.chunks))
        # a DataLoader even without workers: each pass draws one seed from torch's generator, whatever the workers
        chunks = DataLoader(_Chunks(self.stream), batch_size=None, num_workers=workers,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        refs = ((chunk, i) for chunk in _in_order(chunks) for i in range(len(chunk["row"])))
        for group in batched(self.stream.mix(refs), self.batch_size):
            yield _collate(group, self.pin_memory)


def make_loader(cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int,
                batch_size: int, workers: int, pin_memory: bool = False) -> StreamLoader:
    return StreamLoader(CacheStream(cfg, shards, repeats, labels, epoch), batch_size, workers, pin_memory)


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
            raise ValueError("--labelled-ratio must be between 0 and 1")
        if n_l / (n_l + n_u) < ratio:
            reps[labelled] = max(1, int(round(ratio / (1 - ratio) * n_u / n_l)))
    return reps
