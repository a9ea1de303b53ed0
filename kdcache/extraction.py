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
from .device_views import colour_maps, decode_batch, replay_views
from .images import BadImage, decode_packed, packed_header
from .mixing import MixSettings, draw_mixes, unmixed
from .pack import member_digest, pack_shard, read_members, shard_name
from .replay import Unreadable, replay_shard
from .cache.backend import cache_path, lock
from .cache.format import DIGEST_BYTES, Layout, arrays, buffer_dtype, computed, shape
from .cache.store import CacheStore
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
    decode: str = "workers"  # workers: decode and replay in the loader; device: on the teacher's device
    mix: MixSettings = MixSettings()  # mixed views (kdcache.mixing); replayed by the workers only


DECODE_PLACES = ("workers", "device")


class ShardClaims:
    """Exclusive per-shard locks (filelock: an OS lock, released by the OS if the process dies)."""

    def __init__(self, images_dir: Path):
        self.dir = cache_path(images_dir)
        self.held: dict[int, filelock.FileLock] = {}

    def try_claim(self, k: int) -> bool:
        """Object storage has no locks (every claim succeeds): ranks and --part split the shards there."""
        claim = lock(self.dir / f"shard-{k:05d}.lock")
        try:
            claim.acquire(timeout=0)
        except filelock.Timeout:
            return False
        self.held[k] = claim
        return True

    def wait_for(self, k: int) -> None:
        """Block until no other process holds shard k (its holder finished it, or died), then let it go: the
        caller looks again at what is done and claims what is not."""
        with lock(self.dir / f"shard-{k:05d}.lock"):
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
        shard = _ShardRecords(k, self.spec, self._members(k))
        if self.spec.decode == "device":
            yield from self._encoded_batches(shard)
        else:
            yield from self._pixel_batches(shard)

    def _pixel_batches(self, shard: "_ShardRecords"):
        """Batches of replayed views (uint8 pixels at the teacher's input size), in (row, view) order."""
        spec, lay = self.spec, self.spec.layout
        images, idx_row, idx_view = [], [], []

        def batch(final: bool):
            out = {"shard": shard.k, "rows": torch.tensor(idx_row, dtype=torch.long),
                   "view_idx": torch.tensor(idx_view, dtype=torch.long),
                   "images": torch.stack(images) if images else torch.empty(0, 3, spec.input_size,
                                                                             spec.input_size, dtype=torch.uint8),
                   "final": final}
            if final:
                out.update(shard.final())
            images.clear(), idx_row.clear(), idx_view.clear()
            return out

        draws = [(row, v) for row in shard.packed for v in range(lay.views)]
        for got in replay_shard(shard.packed, draws, shard.sample, [(spec.input_size, spec.interpolation)],
                                spec.image_bound, shard.mix_of if spec.mix.on else None, shard.first):
            if isinstance(got, Unreadable):
                shard.bad(got.row, f"packed image does not decode: {got.reason}")
                continue
            images.append(got.images[0])
            idx_row.append(got.row - shard.first), idx_view.append(got.view)
            if len(images) == spec.batch_size:
                yield batch(False)
        yield batch(True)

    def _encoded_batches(self, shard: "_ShardRecords"):
        """Batches of whole rows for `decode="device"`: the packed JPEG bytes (decoded on the teacher's device),
        small PNGs decoded here, and every view's parameters; the device replays them (`device_views`)."""
        spec, lay = self.spec, self.spec.layout
        per_batch = max(1, spec.batch_size // lay.views)
        group: list[tuple[int, str, object, tuple[int, int]]] = []
        for row, data in shard.packed.items():
            try:
                kind, w, h = packed_header(data, spec.image_bound)
                item = decode_packed(data, spec.image_bound) if kind == "PNG" else data
            except BadImage as e:
                shard.bad(row, f"packed image does not decode: {e}")
                continue
            shard.sample_size(row, w, h)
            group.append((row - shard.first, kind, item, (h, w)))
            if len(group) == per_batch:
                yield encoded_batch(shard, group, lay.views, False)
                group = []
        yield encoded_batch(shard, group, lay.views, True)


class _ShardRecords:
    """One shard's rows as the teacher pass records them: packed bytes, digests, each row's views (sampled
    from its decoded size), status and reason."""

    def __init__(self, k: int, spec: StreamSpec, members: list):
        self.k, self.spec, self.lay = k, spec, spec.layout
        lay = spec.layout
        rows = lay.rows(k)
        self.first, n = rows.start, len(rows)
        self.views = np.zeros((n, lay.views, P), np.float32)
        self.mix = np.stack([unmixed(lay.views)] * n) if spec.mix.on and n else None
        self._partners: tuple[list[int], dict] | None = None  # (rows that may be partners, their sizes)
        self.status = np.full(n, Status.DONE, np.uint8)
        self.reasons = [""] * n
        self.digests = np.stack([np.frombuffer(member_digest(ext, data), np.uint8) for _, ext, data in members]) \
            if members else np.zeros((0, DIGEST_BYTES), np.uint8)
        self.packed = {}
        for row, ext, data in members:
            if ext == "bad":
                self.bad(row, data.decode(errors="replace"))
            else:
                self.packed[row] = data

    def bad(self, row: int, reason: str) -> None:
        self.status[row - self.first], self.reasons[row - self.first] = Status.BAD, reason

    def sample(self, row: int, image: torch.Tensor) -> np.ndarray:
        """The row's views, drawn from its decoded image's size (`replay_shard`'s views_of)."""
        _, h, w = image.shape
        return self.sample_size(row, w, h)

    def sample_size(self, row: int, width: int, height: int) -> np.ndarray:
        spec = self.spec
        self.views[row - self.first] = sample_views(row, width, height, self.lay.views, spec.policy, spec.seed,
                                                    spec.crop_pct)
        return self.views[row - self.first]

    def mix_of(self, row: int) -> np.ndarray:
        """The row's mix records (`replay_shard`'s mix_of): partners among the shard's rows whose packed image
        has a readable header, each with a view drawn from its size."""
        if self._partners is None:
            sizes = {}
            for r, data in self.packed.items():
                try:
                    _, w, h = packed_header(data, self.spec.image_bound)
                except BadImage:
                    continue
                sizes[r] = (w, h)
            self._partners = (sorted(sizes), sizes)
        spec = self.spec
        candidates, sizes = self._partners
        self.mix[row - self.first] = draw_mixes(row, self.first, candidates, sizes, self.lay.views, spec.mix,
                                                spec.policy, spec.seed)
        return self.mix[row - self.first]

    def final(self) -> dict:
        out = {"views": self.views, "status": self.status, "reasons": list(self.reasons),
               "image_digests": self.digests}
        return out if self.mix is None else dict(out, mix=self.mix)


def encoded_batch(shard: _ShardRecords, group: list, views: int, final: bool) -> dict:
    """Rows (row in shard, kind, JPEG bytes or PNG pixels, (h, w)) as one batch: the JPEGs concatenated into
    one byte tensor (one copy to pinned memory, not one per image), the PNGs padded into one tensor."""
    jpegs = [item for _, kind, item, _ in group if kind == "JPEG"]
    pngs = [item for _, kind, item, _ in group if kind == "PNG"]
    offsets = np.cumsum([0] + [len(b) for b in jpegs])
    hm = max((p.shape[1] for p in pngs), default=0)
    wm = max((p.shape[2] for p in pngs), default=0)
    pixels = torch.zeros(len(pngs), 3, hm, wm, dtype=torch.uint8)
    for i, p in enumerate(pngs):
        pixels[i, :, :p.shape[1], :p.shape[2]] = p
    rows = [j for j, *_ in group]
    params = shard.views[rows] if rows else np.zeros((0, views, P), np.float32)
    out = {"shard": shard.k, "encoded": True, "final": final,
           "rows": torch.tensor(rows, dtype=torch.long).repeat_interleave(views),
           "view_idx": torch.arange(views).repeat(len(rows)),
           "jpeg": torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else
           torch.zeros(0, dtype=torch.uint8),
           "jpeg_offsets": torch.from_numpy(offsets.astype(np.int64)),
           "pixels": pixels,
           "kinds": torch.tensor([kind == "JPEG" for _, kind, _, _ in group], dtype=torch.bool),
           "sizes": torch.tensor([hw for *_, hw in group], dtype=torch.long).reshape(-1, 2),
           "params": torch.from_numpy(params),
           "colour": torch.from_numpy(colour_maps(params.reshape(-1, P)).reshape(len(rows), views, 3, 4))}
    if final:
        out.update(shard.final())
    return out


class ShardBuffer:
    """One shard's outputs, filled batch by batch, indexed by (row in shard, view)."""

    def __init__(self, n: int, lay: Layout):
        """Every teacher output of ARRAYS that a cache of `lay` holds."""
        self.data = {a.name: np.zeros((n, *shape(a, lay)[1:]), buffer_dtype(a)) for a in arrays() if computed(a, lay)}

    @staticmethod
    def nbytes(n: int, lay: Layout) -> int:
        """Memory of `n` rows' buffered outputs and their view parameters (float32)."""
        per_row = sum(int(np.prod(shape(a, lay)[1:])) * np.dtype(buffer_dtype(a)).itemsize for a in arrays()
                      if computed(a, lay))
        return n * (per_row + 4 * lay.views * (lay.params + lay.mix_params))

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
    waited: float = 0.0  # of `seconds`, spent waiting for the image stream (the teacher had no batch)
    starting: float = 0.0  # of `waited`, spent waiting for each loader's first batch (workers starting)
    replaying: float = 0.0  # of `seconds`, this thread's time decoding and replaying views on the device
    left: list = field(default_factory=list)

    COUNTS = ("images", "views", "shards", "seconds", "waited", "starting", "replaying")

    def add(self, other: "PassStats") -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.COUNTS}, "left": list(self.left)}


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
            stats.add(_pass_over(store, dataset, teacher, spec, todo, claims, workers, device, bar))
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


def _timed(loader):
    """The loader's batches, each with the seconds spent waiting for it."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t


def _pass_over(store, dataset, teacher, spec, todo, claims, workers, device, bar) -> PassStats:
    """The teacher over the claimed shards `todo`; returns what it did."""
    lay = spec.layout
    stream = ShardImageStream(dataset, todo, spec)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    total = sum(len(lay.rows(k)) for k in todo)
    stats = PassStats(images=total, views=total * lay.views, shards=len(todo))
    writer = ShardWriter(store, claims)
    buffers: dict[int, ShardBuffer] = {}
    counted: dict[int, int] = {}  # view-images of each shard shown on the bar so far
    late_bad: dict[int, dict[int, str]] = {}  # rows that did not decode on the device, per shard
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    start, first = time.perf_counter(), True
    # Outputs are copied to the host one batch late: batch i+1 is queued on the device before batch i's
    # copy waits for it, so an accelerator never idles while the host stores rows.
    pending = None
    try:
        for batch, wait in _timed(loader):
            stats.waited += wait
            stats.starting, first = (wait if first else stats.starting), False
            k = int(batch["shard"])
            buf = buffers.setdefault(k, ShardBuffer(len(lay.rows(k)), lay))
            queued = None
            bar.update(len(batch["rows"]))  # one entry per view-image, every batch
            counted[k] = counted.get(k, 0) + len(batch["rows"])
            images, rows, view_idx = _teacher_inputs(batch, spec, device, late_bad.setdefault(k, {}), stats)
            if len(rows):
                with autocast:
                    outputs = teacher(images, token_grid=lay.token_grid)
                queued = (buf, rows, view_idx, ShardBuffer.stage(outputs))
            if pending is not None:
                pending[0].put(*pending[1:])
            pending = queued
            if batch["final"]:
                if pending is not None:
                    pending[0].put(*pending[1:])
                    pending = None
                writer.submit(k, *_shard_outputs(store, buffers.pop(k), batch, late_bad.pop(k, {})))
                bar.update(len(lay.rows(k)) * lay.views - counted.pop(k, 0))  # the views of bad rows
    except BaseException:
        writer.close(raise_errors=False)  # finished shards still land; partial ones stay todo
        raise
    else:
        writer.close()
    finally:
        claims.release_all()
    stats.seconds = time.perf_counter() - start
    return stats


def _teacher_inputs(batch: dict, spec: StreamSpec, device, late_bad: dict, stats: PassStats
                    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(uint8 views on the device, row in shard and view of each): the loader's pixels, or for an encoded
    batch the views replayed on the device; rows that do not decode there are added to `late_bad`."""
    rows, view_idx = batch["rows"].numpy(), batch["view_idx"].numpy()
    if not batch.get("encoded"):
        return batch["images"].to(device, non_blocking=True), rows, view_idx
    t = time.perf_counter()
    images, keep, bad = replay_encoded(batch, spec, device)
    stats.replaying += time.perf_counter() - t  # host time: the device work itself is queued, not waited for
    late_bad.update(bad)
    return images, rows[keep], view_idx[keep]


def _shard_outputs(store: CacheStore, buf: ShardBuffer, final: dict, late_bad: dict) -> tuple[dict, np.ndarray]:
    """A finished shard's arrays and statuses, as the writer stores them."""
    status, reasons = np.asarray(final["status"], np.uint8).copy(), list(final["reasons"])
    for j, why in late_bad.items():
        status[j], reasons[j] = Status.BAD, why
    for arr in buf.data.values():  # a row found bad after some of its views ran (a mix partner) keeps none
        arr[status == Status.BAD] = 0
    data = dict(buf.data, views=np.asarray(final["views"], np.float32),
                reasons=np.array(reasons, dtype=object).astype(str))
    if "mix" in final:
        data["mix"] = np.asarray(final["mix"], np.float32)
    if store.checksum_version >= 2:
        data["image_digests"] = np.asarray(final["image_digests"], np.uint8)
    return data, status


def replay_encoded(batch: dict, spec: StreamSpec, device) -> tuple[torch.Tensor, np.ndarray, dict]:
    """An encoded batch (`encoded_batch`) replayed on `device`: (uint8 [N, 3, S, S] views of the rows that
    decode, a mask over the batch's view entries of those kept, {row in shard: reason} for the others)."""
    kinds = batch["kinds"].tolist()
    sizes = [tuple(hw) for hw in batch["sizes"].tolist()]
    offsets = batch["jpeg_offsets"].tolist()
    jpegs = [batch["jpeg"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    decoded = decode_batch(jpegs, [hw for hw, jpeg in zip(sizes, kinds) if jpeg], device, spec.image_bound)
    pixels = batch["pixels"].to(device, non_blocking=True)
    row_of = batch["rows"].numpy()[::spec.layout.views]
    images, ok, bad = [], [], {}
    j = p = 0
    for r, jpeg in enumerate(kinds):
        if jpeg:
            img, why = decoded.images[j], decoded.unreadable.get(j)
            j += 1
        else:
            h, w = sizes[r]
            img, why = pixels[p, :, :h, :w], None
            p += 1
        if img is None:
            bad[int(row_of[r])] = why
        else:
            images.append(img)
        ok.append(img is not None)
    keep = np.repeat(np.array(ok, bool), spec.layout.views)
    if not images:
        s = spec.input_size
        return torch.empty(0, 3, s, s, dtype=torch.uint8, device=device), keep, bad
    okt = torch.tensor(ok)
    out = replay_views(images, batch["params"][okt], batch["colour"][okt], spec.input_size, spec.interpolation)
    return out, keep, bad


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
    with lock(store.images_dir / "head-fit.lock"):
        store = CacheStore.open(store.path, mode="r+")  # another process may have fitted it meanwhile
        if needs_fit(store):
            if store.meta.head_fitted:  # its arrays are gone: the logits are rewritten, so it is not fitted meanwhile
                store.update_attrs(head_fit={"fitted": False})
            fit_store_probe(store, train_split=Split.TRAIN)
            store = CacheStore.open(store.path, mode="r+")
    return store
