"""The teacher pass: shard claims, the image stream, the async shard writer, and the pass itself.

The stream packs (once) and reads tar shard k in a DataLoader worker, decodes each image,
draws its views and replays them at the teacher's input size. Batches never cross a shard and
are formed in (row, view) order, so a shard's outputs do not depend on which process or run
computed it: a resumed or multi-rank cache is bit-identical to a single uninterrupted run.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .codes import Split, Status
from .datasets import Dataset
from .location import cache_path, file_lock, is_remote
from .pack import member_digest, pack_shard, read_members, shard_name
from .replay import Unreadable, replay_shard
from .store import DIGEST_BYTES, CacheStore, Layout
from .views import P, sample_views


@dataclass(frozen=True)
class StreamSpec:
    images_dir: str
    layout: Layout
    image_bound: int
    input_size: int
    interpolation: str
    crop_pct: float
    policy: str
    seed: int
    batch_size: int  # view-images per teacher batch


class ShardClaims:
    """Exclusive per-shard locks (filelock: an OS lock, released by the OS if the process dies)."""

    def __init__(self, images_dir: Path):
        self.dir = cache_path(images_dir)
        self.remote = is_remote(self.dir)
        self.held: dict[int, filelock.FileLock] = {}

    def try_claim(self, k: int) -> bool:
        if self.remote:  # object storage has no locks: ranks and --part split the shards there
            return True
        lock = filelock.FileLock(str(self.dir / f"shard-{k:05d}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        self.held[k] = lock
        return True

    def wait_for(self, k: int) -> None:
        """Block until no other process holds shard k (its holder finished it, or died), then let it go: the
        caller looks again at what is done and claims what is not."""
        if self.remote:
            return
        with filelock.FileLock(str(self.dir / f"shard-{k:05d}.lock")):
            pass

    def release(self, k: int) -> None:
        lock = self.held.pop(k, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for k in list(self.held):
            self.release(k)


def ensure_packed(dataset: Dataset, spec: StreamSpec, k: int) -> Path:
    path = cache_path(spec.images_dir) / shard_name(k)
    if not path.exists():
        pack_shard(dataset, spec.layout.rows(k), path, spec.image_bound)
    return path


class ShardImageStream(IterableDataset):
    """Yields teacher batches for a list of shards; each DataLoader worker takes every W-th shard."""

    def __init__(self, dataset: Dataset, shards: list[int], spec: StreamSpec):
        self.dataset, self.shards, self.spec = dataset, list(shards), spec

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        if info is not None:
            torch.set_num_threads(1)  # workers decode; the teacher owns the cores
        for k in mine:
            yield from self._shard_batches(k)

    def _members(self, k: int):
        """Shard k's members in row order; a damaged or foreign tar is packed again once."""
        rows = self.spec.layout.rows(k)
        path = ensure_packed(self.dataset, self.spec, k)
        found, problems = read_members(path, rows)
        if problems or sorted(found) != list(rows):
            path.unlink(missing_ok=True)
            found, problems = read_members(ensure_packed(self.dataset, self.spec, k), rows)
        if problems or sorted(found) != list(rows):
            raise RuntimeError(f"{path}: packing did not give one member per row {rows.start}..{rows.stop - 1} "
                               f"({'; '.join(problems) or 'rows missing'})")
        return [(row, *found[row]) for row in rows]

    def _shard_batches(self, k: int):
        spec, lay = self.spec, self.spec.layout
        rows = lay.rows(k)
        n = len(rows)
        views = np.zeros((n, lay.views, P), np.float32)
        status = np.full(n, Status.DONE, np.uint8)
        reasons = [""] * n
        images, idx_row, idx_view = [], [], []

        def batch(final: bool):
            out = {"shard": k, "rows": torch.tensor(idx_row, dtype=torch.long),
                   "view_idx": torch.tensor(idx_view, dtype=torch.long),
                   "images": torch.stack(images) if images else torch.empty(0, 3, spec.input_size,
                                                                             spec.input_size, dtype=torch.uint8),
                   "final": final}
            if final:
                out.update(views=views, status=status, reasons=list(reasons), image_digests=digests)
            images.clear(), idx_row.clear(), idx_view.clear()
            return out

        members = self._members(k)
        digests = np.stack([np.frombuffer(member_digest(ext, data), np.uint8) for _, ext, data in members]) \
            if members else np.zeros((0, DIGEST_BYTES), np.uint8)
        packed = {}
        for row, ext, data in members:
            if ext == "bad":
                status[row - rows.start], reasons[row - rows.start] = Status.BAD, data.decode(errors="replace")
            else:
                packed[row] = data

        def sampled(row: int, image: torch.Tensor) -> np.ndarray:
            _, h, w = image.shape
            views[row - rows.start] = sample_views(row, w, h, lay.views, spec.policy, spec.seed, spec.crop_pct)
            return views[row - rows.start]

        draws = [(row, v) for row in packed for v in range(lay.views)]
        for got in replay_shard(packed, draws, sampled, [(spec.input_size, spec.interpolation)], spec.image_bound):
            j = got.row - rows.start
            if isinstance(got, Unreadable):
                status[j], reasons[j] = Status.BAD, f"packed image does not decode: {got.reason}"
                continue
            images.append(got.images[0])
            idx_row.append(j), idx_view.append(got.view)
            if len(images) == spec.batch_size:
                yield batch(False)
        yield batch(True)


class ShardBuffer:
    """One shard's outputs, filled batch by batch, indexed by (row in shard, view)."""

    def __init__(self, n: int, lay: Layout, keep_tokens: bool):
        self.data = {"features": np.zeros((n, lay.views, lay.feature_dim), np.float16)}
        if lay.num_classes:
            self.data["logits"] = np.zeros((n, lay.views, lay.num_classes), np.float16)
        if keep_tokens:
            self.data["tokens"] = np.zeros((n, lay.views, lay.token_grid ** 2, lay.token_dim), np.float16)

    @staticmethod
    def stage(outputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], object]:
        """Start the copy of a batch's outputs to the host (fp16); returns (host tensors, a CUDA event
        or None). On an accelerator the copy is queued behind the forward pass and nothing waits yet."""
        half = {k: v.to(torch.float16) for k, v in outputs.items()}
        if not any(v.is_cuda for v in half.values()):
            return half, None
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in half.items()}
        for k, v in half.items():
            host[k].copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def put(self, rows: np.ndarray, view_idx: np.ndarray, staged: tuple[dict[str, torch.Tensor], object]) -> None:
        outputs, event = staged
        if event is not None:
            event.synchronize()
        for name, arr in self.data.items():
            if name in outputs:
                arr[rows, view_idx] = outputs[name].numpy()


class ShardWriter:
    """Writes finished shards on a background thread so the teacher keeps computing."""

    def __init__(self, store: CacheStore, claims: ShardClaims, max_pending: int = 2):
        self.store, self.claims = store, claims
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            k, data, status = item
            try:
                if self.error is None:
                    self.store.write_shard(k, data, status)
            except BaseException as e:  # surfaced to the main thread by check()
                self.error = e
            finally:
                self.claims.release(k)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, k: int, data: dict, status: np.ndarray) -> None:
        self.check()
        self.queue.put((k, data, status))

    def close(self, raise_errors: bool = True) -> None:
        self.queue.put(None)
        self.thread.join()
        if raise_errors:
            self.check()


@dataclass
class PassStats:
    """What one process's teacher pass did: images and view-images computed, shards written, seconds in the
    pass (start-up and probe fitting excluded), and the shards it waited for while another process held them."""

    images: int = 0
    views: int = 0
    shards: int = 0
    seconds: float = 0.0
    left: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"images": self.images, "views": self.views, "shards": self.shards, "seconds": self.seconds,
                "left": list(self.left)}


def teacher_pass(store: CacheStore, dataset: Dataset, teacher, spec: StreamSpec, shards: list[int], *, workers: int,
                 device: torch.device, progress: bool) -> PassStats:
    """Run the teacher over `shards` (those not done yet), a few at a time: claim some that no other process
    holds or finished, compute and write them, repeat. Processes started by hand on one cache so split its
    shards. When every shard left is held by another process (another extract, or a rank of a killed job that
    still runs), this one waits for each holder, then computes what it left undone: it returns only when
    every shard of `shards` is done. `left` lists the shards it waited for."""
    lay = spec.layout
    claims = ShardClaims(spec.images_dir)
    chunk = max(2, 2 * workers)
    left, stats, waited = list(shards), PassStats(), []
    bar = tqdm(total=sum(len(lay.rows(k)) for k in shards) * lay.views, unit="view",
               desc=f"extract {store.path.name}", disable=None if progress else True, dynamic_ncols=True)
    try:
        while left:
            left, todo = _claim_some(store, claims, left, chunk)
            if not todo:
                if left:  # every shard left is being written by another process
                    _wait_for_holder(claims, left[0], waited)
                continue
            left = [k for k in left if k not in todo]
            n, seconds = _pass_over(store, dataset, teacher, spec, todo, claims, workers, device, bar)
            stats.images += n
            stats.views += n * lay.views
            stats.shards += len(todo)
            stats.seconds += seconds
    finally:
        bar.close()
    stats.left = sorted(set(waited))
    return stats


def _claim_some(store: CacheStore, claims: ShardClaims, left: list[int], chunk: int) -> tuple[list[int], list[int]]:
    """(the shards of `left` not done yet, up to `chunk` of them claimed by this process and not done)."""
    done = store.shard_done()
    left = [k for k in left if not done[k]]
    todo = []
    for k in left:
        if len(todo) == chunk:
            break
        if claims.try_claim(k):
            todo.append(k)
    done = store.shard_done()  # another process may have finished a shard before we claimed it
    for k in [k for k in todo if done[k]]:
        claims.release(k)
    return [k for k in left if not done[k]], [k for k in todo if not done[k]]


def _wait_for_holder(claims: ShardClaims, k: int, waited: list[int]) -> None:
    if not waited:
        print(f"shard {k} (and maybe more) is being written by another process on this cache; waiting for it "
              "(a holder that dies leaves its shard to this one)", file=sys.stderr, flush=True)
    waited.append(k)
    claims.wait_for(k)


def _pass_over(store, dataset, teacher, spec, todo, claims, workers, device, bar) -> tuple[int, float]:
    """The teacher over the claimed shards `todo`; returns (images, seconds)."""
    lay = spec.layout
    stream = ShardImageStream(dataset, todo, spec)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    total = sum(len(lay.rows(k)) for k in todo)
    writer = ShardWriter(store, claims)
    buffers: dict[int, ShardBuffer] = {}
    counted: dict[int, int] = {}  # view-images of each shard shown on the bar so far
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    start = time.perf_counter()
    # Outputs are copied to the host one batch late: batch i+1 is queued on the device before batch i's
    # copy waits for it, so an accelerator never idles while the host stores rows.
    pending = None
    try:
        for batch in loader:
            k = int(batch["shard"])
            buf = buffers.setdefault(k, ShardBuffer(len(lay.rows(k)), lay, keep_tokens=lay.token_grid > 0))
            queued = None
            bar.update(len(batch["rows"]))  # one entry per view-image, every batch
            counted[k] = counted.get(k, 0) + len(batch["rows"])
            if len(batch["rows"]):
                with autocast:
                    outputs = teacher(batch["images"].to(device, non_blocking=True), token_grid=lay.token_grid)
                queued = (buf, batch["rows"].numpy(), batch["view_idx"].numpy(), ShardBuffer.stage(outputs))
            if pending is not None:
                pending[0].put(*pending[1:])
            pending = queued
            if batch["final"]:
                if pending is not None:
                    pending[0].put(*pending[1:])
                    pending = None
                data = dict(buffers.pop(k).data, views=np.asarray(batch["views"], np.float32),
                            reasons=np.array(batch["reasons"], dtype=object).astype(str))
                if store.checksum_version >= 2:
                    data["image_digests"] = np.asarray(batch["image_digests"], np.uint8)
                writer.submit(k, data, np.asarray(batch["status"], np.uint8))
                bar.update(len(lay.rows(k)) * lay.views - counted.pop(k, 0))  # the views of bad rows
    except BaseException:
        writer.close(raise_errors=False)  # finished shards still land; partial ones stay todo
        raise
    else:
        writer.close()
    finally:
        claims.release_all()
    return total, time.perf_counter() - start


def fit_probe_once(store: CacheStore) -> CacheStore:
    """Fit the extract probe head once every shard is done, if it is not fitted yet (or its arrays are gone);
    under the cache's head lock, so of several processes finishing one cache (ranks, hand-started extracts, a
    rank of a killed job that still runs) one fits it and the others wait for that fit, then read it. Returns
    the store as reopened."""
    from .heads import fit_store_probe

    def needs_fit(s: CacheStore) -> bool:
        return s.meta.head_kind == "probe" and (not s.meta.head_fitted or s.meta.probe_missing(s.group) is not None)

    store = CacheStore.open(store.path, mode="r+")  # the attributes as they are now, not as this run began
    if not store.shard_done().all() or not needs_fit(store):
        return store
    with file_lock(store.images_dir / "head-fit.lock"):
        store = CacheStore.open(store.path, mode="r+")  # another process may have fitted it meanwhile
        if needs_fit(store):
            if store.meta.head_fitted:  # its arrays are gone: the logits are rewritten, so it is not fitted meanwhile
                store.update_attrs(head_fit={"fitted": False})
            fit_store_probe(store, train_split=Split.TRAIN)
            store = CacheStore.open(store.path, mode="r+")
    return store
