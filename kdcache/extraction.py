"""The pieces of the teacher pass: shard claims, the image stream, and the async shard writer.

The stream packs (once) and reads tar shard k in a DataLoader worker, decodes each image,
draws its views and replays them at the teacher's input size. Batches never cross a shard and
are formed in (row, view) order, so a shard's outputs do not depend on which process or run
computed it: a resumed or multi-rank cache is bit-identical to a single uninterrupted run.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import filelock
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import Dataset
from .images import BadImage, decode_packed
from .pack import member_digest, pack_shard, read_members, shard_name
from .store import DIGEST_BYTES, STATUS_BAD, STATUS_DONE, CacheStore, Layout
from .views import P, apply, sample_views


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
        self.dir = Path(images_dir)
        self.held: dict[int, filelock.FileLock] = {}

    def try_claim(self, k: int) -> bool:
        lock = filelock.FileLock(str(self.dir / f"shard-{k:05d}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        self.held[k] = lock
        return True

    def release(self, k: int) -> None:
        lock = self.held.pop(k, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for k in list(self.held):
            self.release(k)


def ensure_packed(dataset: Dataset, spec: StreamSpec, k: int) -> Path:
    path = Path(spec.images_dir) / shard_name(k)
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
        status = np.full(n, STATUS_DONE, np.uint8)
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
        for row, ext, data in members:
            j = row - rows.start
            if ext == "bad":
                status[j], reasons[j] = STATUS_BAD, data.decode(errors="replace")
                continue
            try:
                img = decode_packed(data, spec.image_bound)
            except BadImage as e:
                status[j], reasons[j] = STATUS_BAD, f"packed image does not decode: {e}"
                continue
            _, h, w = img.shape
            views[j] = sample_views(row, w, h, lay.views, spec.policy, spec.seed, spec.crop_pct)
            for v in range(lay.views):
                images.append(apply(img, views[j, v], spec.input_size, spec.interpolation))
                idx_row.append(j), idx_view.append(v)
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
