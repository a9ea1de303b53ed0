"""The stage-two stream: tar shard k and cache rows of shard k, read together, in order.

    shard order (shuffled per epoch) -> this rank's shards -> this worker's shards
    -> read tar k sequentially + cache rows of k (one chunk-aligned slice per array)
    -> pick a view per sample per epoch -> replay.replay_shard -> shuffle buffer -> batches

The cache is only read here; the teacher never runs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .pack import member_digest, read_members, shard_name
from .replay import Unreadable, replay_shard, stored_views
from .store import CacheError, CacheStore


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


class CacheStream(IterableDataset):
    """Yields one dict per (sample, repeat): image (uint8, replayed view), cached teacher rows, label."""

    def __init__(self, cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int):
        self.cfg, self.shards, self.repeats, self.labels, self.epoch = cfg, list(shards), repeats, labels, epoch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        store = CacheStore.open(self.cfg.cache)
        samples = (s for k in self.shards[wid::nw] for s in self._shard(store, k))
        if self.cfg.clean_only or self.cfg.shuffle_buffer <= 1:
            yield from samples
        else:
            yield from _shuffled(samples, self.cfg.shuffle_buffer,
                                 np.random.default_rng([self.cfg.seed, self.epoch, 2, wid]))

    def _shard(self, store: CacheStore, k: int):
        cfg = self.cfg
        rows = store.layout.rows(k)
        reps = self.repeats[rows.start:rows.stop]
        if not reps.any():
            return
        # one slice per array: chunk-aligned, never a per-sample Zarr read
        try:
            # each array read is compared with its recorded digest (cheap next to decoding the images)
            feats = store.read_checked("features", k) if cfg.features else None
            views = store.read_checked("views", k)
            logits = store.read_checked("logits", k) if cfg.logits else None
            tokens = store.read_checked("tokens", k) if cfg.tokens else None
            # the tar is read sequentially once, its members checked against their digests
            packed = self._packed(store, k, reps)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged shard file raises from its codec or index
            raise CacheError(f"shard {k} of cache {cfg.cache} cannot be read ({type(e).__name__}: {e}); check it with "
                             "`info --verify` and fix it with `extract --repair`") from None
        rng = np.random.default_rng([cfg.seed, self.epoch, 3, k])
        num_views = views.shape[1]
        # the shard's draws (a row repeated r times gives r draws) are visited in a random order, so
        # repeats never arrive back to back
        draws = np.repeat(np.fromiter(packed, dtype=np.int64, count=len(packed)),
                          [int(reps[r - rows.start]) for r in packed])
        if not cfg.clean_only:
            draws = draws[rng.permutation(len(draws))]
        # one view per draw, drawn in the draws' order (view 0, the clean one, for evaluation)
        picks = [(row, 0 if cfg.clean_only else int(rng.integers(num_views))) for row in draws.tolist()]
        outputs = [(cfg.image_size, cfg.interpolation)]
        if cfg.teacher_size:
            outputs.append((cfg.teacher_size, cfg.teacher_interpolation))
        for got in replay_shard(packed, picks, stored_views(views, rows.start), outputs, store.meta.image_bound):
            if isinstance(got, Unreadable):
                _report(k, [f"row {got.row}: {got.reason}"])
                continue
            row, v, j = got.row, got.view, got.row - rows.start
            sample = {"image": got.images[0], "label": int(self.labels[row]), "row": row, "view": v}
            if cfg.teacher_size:
                sample["teacher_image"] = got.images[1]
            if feats is not None:
                sample["feature"] = torch.from_numpy(feats[j, v].astype(np.float32))
            if logits is not None:
                sample["logits"] = torch.from_numpy(logits[j, v].astype(np.float32))
            if tokens is not None:
                sample["tokens"] = torch.from_numpy(tokens[j, v].astype(np.float32))
            yield sample


    def _packed(self, store: CacheStore, k: int, reps: np.ndarray) -> dict[int, bytes]:
        """The packed bytes of shard k's rows to stream. Each member is checked against the digest taken
        when it was packed; a damaged, swapped or missing member is skipped and reported, never decoded."""
        rows = store.layout.rows(k)
        found, problems = read_members(store.images_dir / shard_name(k), rows)
        digests = store.read_checked("image_digests", k) if store.has("image_digests") else None
        packed, wrong, missing = {}, 0, 0
        for row in rows:
            if reps[row - rows.start] <= 0:
                continue
            if row not in found:
                missing += 1
                continue
            ext, data = found[row]
            if digests is not None and member_digest(ext, data) != bytes(digests[row - rows.start]):
                wrong += 1
            elif ext != "bad":
                packed[row] = data
        if wrong:
            problems.append(f"{wrong} member(s) differ from their recorded digest")
        if missing:
            problems.append(f"{missing} row(s) to stream have no member")
        if problems:
            _report(k, problems)
        return packed


def _report(k: int, problems: list[str]) -> None:
    """Damaged packed images are skipped, and said so (once per shard and epoch, on stderr)."""
    print(f"warning: shard {k} packed images: {'; '.join(problems)}; those rows are skipped "
          "(check with `python cli.py info --cache CACHE --verify`, fix with `extract --repair`)",
          file=sys.stderr)


def _shuffled(samples, size: int, rng: np.random.Generator):
    """A bounded shuffle buffer: mixes samples across the shards a worker reads."""
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        buf[i], s = s, buf[i]
        yield s
    order = rng.permutation(len(buf))
    for i in order:
        yield buf[i]


def make_loader(cfg: StreamConfig, shards: list[int], repeats: np.ndarray, labels: np.ndarray, epoch: int,
                batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    stream = CacheStream(cfg, shards, repeats, labels, epoch)
    workers = min(workers, len(shards)) if shards else 0
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


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
