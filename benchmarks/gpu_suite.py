"""The GPU set: one run, one results file, written part by part (`python benchmarks/bench.py --gpu`).

Parts, in order; each is time-boxed, and one that fails or does not fit in the deadline is recorded as such
while the others still run:

  environment  the GPU, torch, cores; which attention kernels each teacher's blocks use
  model_only   ViT-L/14 DINOv2 at 224 px and CLIP ViT-L/14: img/s in bf16 autocast at batch 256, peak memory;
               for DINOv2 also fp32, TF32 and bf16 + channels_last
  extraction   the teacher pass (`kdcache.extraction.teacher_pass`, as the stage runs it) over real-photo JPEGs
               x 4 views, views decoded by the loader's workers and on the device; img/s, its ratio to the
               same teacher's model-only img/s measured between the passes, the time the teacher waited for
               the image stream (the CPU pipeline's share)
  replay       decode and view replay on the device alone: views/s, and pixel differences to the CPU replay
  training     MobileNetV3-Large at 224 px from the cache against the same student on tensors already on the GPU
  pipeline     the CPU image pipeline's views/s per core (the `make bench` section)
  compile      DINOv2 under torch.compile (last: compiling ViT-L takes minutes)

No network: teachers are random-init (speed does not depend on the weights), images are photos that installed
packages ship (`photos.py`). `--device cpu --tiny` runs the same parts with tiny models (the tests do).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.datasets import create_dataset
from kdcache.extract.rows import in_row_order
from kdcache.device_views import decode_batch
from kdcache.train.engine import TrainModule, _to, make_optimizer
from kdcache.extraction import ShardImageStream, StreamSpec, replay_encoded, teacher_pass
from kdcache.images import decode_packed
from kdcache.train.loader import StreamConfig, labelled_repeats, make_loader, rank_shards
from kdcache.methods import create_method
from kdcache.methods.base import Dims
from kdcache.pack import read_shard, shard_name
from kdcache.stages import extract
from kdcache.cache.store import CacheStore
from kdcache.students import create_student
from kdcache.teachers import attention_kernels, create_teacher
from kdcache.views import apply

from photos import make_photo_folder

TARGETS = {"model_only_img_per_s": 3000.0, "extraction_over_model_only": 0.90, "training_cache_over_synthetic": 0.90}


@dataclass
class Settings:
    teachers: tuple = (("dinov2", "vit_large_patch14_dinov2@224"), ("clip", "open_clip:ViT-L-14"))
    batch: int = 256
    model_steps: int = 12  # teacher batches per model-only measurement
    repeats: int = 3
    images: int = 8192
    views: int = 4
    shard_size: int = 256  # 32 shards: two claims of 2 x 14 workers, as the stage chunks them
    workers: int = 14
    extract_teachers: tuple = ("dinov2", "clip")
    student: str = "mobilenetv3_large_100"
    image_size: int = 224
    student_batch: int = 256
    train_steps: int = 30  # timed steps per training measurement, after `train_warmup`
    train_warmup: int = 6
    replay_shards: int = 2
    pipeline_images: int = 128
    compile_mode: str = "default"
    deadline_s: float = 420.0
    # the least seconds a part needs, and the most it may take
    part_s: dict = field(default_factory=lambda: {"environment": (5, 120), "model_only": (60, 150),
                                                  "extraction": (90, 200), "replay": (10, 60),
                                                  "training": (30, 90), "compile": (60, 200),
                                                  "pipeline": (20, 60)})


def tiny_settings(cores: int) -> Settings:
    """The same parts with tiny models and data: the CPU tests run them."""
    return Settings(teachers=(("dinov2", "test_vit@32"), ("clip", "test_vit@48")), batch=6, model_steps=2,
                    repeats=2, images=24, views=2, shard_size=8, workers=min(1, cores), student="mobilenetv3_small_050",
                    image_size=32, student_batch=8, train_steps=2, train_warmup=1, replay_shards=1, pipeline_images=8,
                    deadline_s=600.0)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`."""
    def stop(signum, frame):
        raise PartTimeout(f"stopped after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype=torch.bfloat16):
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype is not None)


def _spec(text: str) -> tuple[str, int | None]:
    name, _, size = text.partition("@")
    return name, int(size) if size else None


class Context:
    """What the parts share: settings, device, scratch folder, the built teachers and caches, the results."""

    def __init__(self, s: Settings, device: torch.device, tmp: Path, results: dict, write):
        self.s, self.device, self.tmp, self.results, self.write = s, device, tmp, results, write
        self.teachers: dict = {}
        self.caches: dict = {}
        self.photos: Path | None = None

    def teacher(self, key: str):
        if key not in self.teachers:
            name, size = _spec(dict(self.s.teachers)[key])
            self.teachers[key] = create_teacher(name, random_init=True, input_size=size).to(self.device).eval()
        return self.teachers[key]

    def peak_reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def model_only_rate(ctx: Context, teacher, dtype=torch.bfloat16, repeats: int | None = None,
                    steps: int | None = None) -> list[float]:
    """img/s of the teacher alone on uint8 batches already on the device (its normalisation included)."""
    s, dev = ctx.s, ctx.device
    size = teacher.preprocess.input_size
    steps = steps or s.model_steps
    x = torch.randint(0, 256, (s.batch, 3, size, size), dtype=torch.uint8, device=dev)

    def run():
        with _autocast(dev, dtype):
            for _ in range(steps):
                teacher(x)
        _sync(dev)

    run()  # warm-up: kernels chosen, memory pools grown
    rates = []
    for _ in range(repeats or s.repeats):
        t = time.perf_counter()
        run()
        rates.append(steps * s.batch / (time.perf_counter() - t))
    return rates


def _median(values) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def part_environment(ctx: Context) -> dict:
    dev = ctx.device
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
           "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    out["attention"] = {}
    for key, _ in ctx.s.teachers:
        t = time.perf_counter()
        teacher = ctx.teacher(key)
        out["attention"][key] = dict(attention_kernels(teacher), build_s=time.perf_counter() - t)
    return out


def part_model_only(ctx: Context) -> dict:
    out = {}
    for key, spec in ctx.s.teachers:
        teacher = ctx.teacher(key)
        ctx.peak_reset()
        rates = model_only_rate(ctx, teacher)
        out[key] = {"teacher": spec, "input_size": teacher.preprocess.input_size, "batch": ctx.s.batch,
                    "bf16_img_per_s": _median(rates), "peak_memory_gib": ctx.peak_gib()}
        ctx.write()
    key = ctx.s.teachers[0][0]
    teacher = ctx.teacher(key)
    ladder = {}
    few = max(1, ctx.s.model_steps // 4)  # fp32 is several times slower
    ladder["fp32"] = _median(model_only_rate(ctx, teacher, dtype=None, repeats=1, steps=few))
    if ctx.device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ladder["tf32"] = _median(model_only_rate(ctx, teacher, dtype=None, repeats=1, steps=few))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    ladder["bf16 autocast"] = out[key]["bf16_img_per_s"]
    tuned = ctx.teacher(key)
    tuned.tune(channels_last=True)
    try:
        ladder["bf16 autocast + channels_last"] = _median(model_only_rate(ctx, tuned))
    finally:
        tuned.model.to(memory_format=torch.contiguous_format)
        tuned.channels_last = False
    out["ladder"] = {"teacher": dict(ctx.s.teachers)[key], "img_per_s": ladder}
    return out


def _extraction_cache(ctx: Context, key: str) -> Path:
    """A cache over the photo folder for teacher `key`, made once by the stage (which packs the images)."""
    if key in ctx.caches:
        return ctx.caches[key]
    s = ctx.s
    if ctx.photos is None:
        ctx.photos = make_photo_folder(ctx.tmp / "photos", s.images)
    name, size = _spec(dict(s.teachers)[key])
    cfg = extract.ExtractConfig(dataset="imagefolder", data_root=str(ctx.photos), teacher=name, teacher_input_size=size,
                                random_init=True, views=s.views, shard_size=s.shard_size, batch_size=s.batch,
                                workers=s.workers, device=str(ctx.device), head="none", progress=False,
                                out=str(ctx.tmp / f"cache-{key}"))
    t = time.perf_counter()
    extract.run(cfg)
    ctx.caches[key] = Path(cfg.out)
    ctx.results.setdefault("first_runs", {})[key] = {"seconds": time.perf_counter() - t, "images": s.images,
                                                     "note": "teacher built, images packed, every shard computed"}
    return ctx.caches[key]


def _pass(ctx: Context, key: str, decode: str) -> dict:
    """Every shard of `key`'s cache recomputed by the teacher pass, views decoded by `decode`."""
    s = ctx.s
    cache = _extraction_cache(ctx, key)
    store = CacheStore.open(cache, mode="r+")
    for k in range(store.layout.num_shards):
        store.mark_todo(k)
    teacher = ctx.teacher(key)
    pre = teacher.preprocess
    spec = StreamSpec(str(store.images_dir), store.layout, 384, pre.input_size, pre.interpolation, pre.crop_pct,
                      "default", 0, s.batch, decode)
    dataset = in_row_order(create_dataset("imagefolder", str(ctx.photos)), store.meta.rows)  # as the cache's rows
    stats = teacher_pass(store, dataset, teacher, spec, list(range(store.layout.num_shards)), workers=s.workers,
                         device=ctx.device, progress=False)
    return {"img_per_s": stats.images / stats.seconds, "waited_share": stats.waited / stats.seconds,
            "seconds": stats.seconds, "steady_img_per_s": stats.images / (stats.seconds - stats.starting),
            "replaying_share": stats.replaying / stats.seconds}


def part_extraction(ctx: Context) -> dict:
    out = {}
    for key in ctx.s.extract_teachers:
        _extraction_cache(ctx, key)
        teacher = ctx.teacher(key)
        runs = {"model_only": [], "workers": [], "device": []}
        ctx.peak_reset()
        for _ in range(ctx.s.repeats):  # interleaved, so drift hits each alike
            runs["model_only"].append(statistics.median(model_only_rate(ctx, teacher, repeats=1)))
            for decode in ("workers", "device"):
                runs[decode].append(_pass(ctx, key, decode))
            entry = {"views": ctx.s.views, "images": ctx.s.images, "workers": ctx.s.workers,
                     "model_only_img_per_s": _median(runs["model_only"]), "peak_memory_gib": ctx.peak_gib()}
            for decode in ("workers", "device"):
                r, m = runs[decode], runs["model_only"]
                entry[decode] = {"img_per_s": _median([x["img_per_s"] for x in r]),
                                 "over_model_only": _median([x["img_per_s"] / y for x, y in zip(r, m)]),
                                 "steady_over_model_only": _median([x["steady_img_per_s"] / y for x, y in zip(r, m)]),
                                 "waited_share": _median([x["waited_share"] for x in r]),
                                 "replaying_share": _median([x["replaying_share"] for x in r])}
            out[key] = entry
            ctx.results["extraction"] = out
            ctx.write()  # each repeat lands, in case the part runs out of time
    return out


def part_replay(ctx: Context) -> dict:
    """Device decode + replay of the first shards' views (the batches `--decode device` streams), against the CPU
    replay of the same views (`decode_packed` + `views.apply`); and the device's decoded JPEGs alone."""
    key = ctx.s.extract_teachers[0]
    store = CacheStore.open(_extraction_cache(ctx, key))
    pre = ctx.teacher(key).preprocess
    lay = store.layout
    spec = StreamSpec(str(store.images_dir), lay, 384, pre.input_size, pre.interpolation, pre.crop_pct, "default", 0,
                      ctx.s.batch, "device")
    shards = list(range(min(ctx.s.replay_shards, lay.num_shards)))
    packed = {row: data for k in shards for row, ext, data in read_shard(store.images_dir / shard_name(k))
              if ext != "bad"}
    out = {"device_decode": _device_decode_check(next(iter(packed.values())), ctx.device)}
    diffs, decode_diffs, views_done, seconds = [], [], 0, 0.0
    for batch in ShardImageStream(None, shards, spec):
        if not len(batch["rows"]):
            continue
        _sync(ctx.device)
        t = time.perf_counter()
        got, keep, _ = replay_encoded(batch, spec, ctx.device)
        _sync(ctx.device)
        seconds += time.perf_counter() - t
        views_done += len(got)
        first = lay.rows(int(batch["shard"])).start
        rows = batch["rows"].numpy()[::lay.views] + first
        want = torch.stack([apply(decode_packed(packed[int(r)], 384), batch["params"][i, v], pre.input_size,
                                  pre.interpolation) for i, r in enumerate(rows) for v in range(lay.views)])
        diffs.append((got.cpu().int() - want[torch.from_numpy(keep)].int()).abs().flatten())
        jpegs = [packed[int(r)] for r, jpeg in zip(rows, batch["kinds"].tolist()) if jpeg]
        dec = decode_batch([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs],
                           [tuple(decode_packed(d, 384).shape[1:]) for d in jpegs], ctx.device)
        for img, d in zip(dec.images, jpegs):
            if img is not None:
                decode_diffs.append((img.cpu().int() - decode_packed(d, 384).int()).abs().flatten())
    d = torch.cat(diffs)
    out |= {"views": views_done, "device_views_per_s": views_done / seconds,
            "views_vs_cpu_replay": {"max": int(d.max()), "mean": float(d.float().mean()),
                                    "share_differing": float((d > 0).float().mean()),
                                    "share_over_1": float((d > 1).float().mean())}}
    if decode_diffs:
        e = torch.cat(decode_diffs)
        out["decode_vs_cpu"] = {"max": int(e.max()), "mean": float(e.float().mean()),
                                "share_differing": float((e > 0).float().mean())}
    return out


def _device_decode_check(data: bytes, device: torch.device) -> str:
    """'ok' where torchvision decodes a JPEG on `device` itself, else the error (decode_batch then falls back to
    decoding on the host, and the device replay measures the host decoder)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)
        return "ok" if img.device.type == device.type else f"decoded on {img.device}"
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"


def _train_steps(module, opt, batches, device, warmup: int, steps: int) -> float:
    """img/s over `steps` training steps after `warmup` (batches from any iterable)."""
    seen, it = 0, iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t, seen = time.perf_counter(), 0
        inputs = _to(next(it), device, channels_last=True)
        with _autocast(device):
            loss = module(**inputs)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(inputs["images"])
    _sync(device)
    return seen / (time.perf_counter() - t)


def part_training(ctx: Context) -> dict:
    s, dev = ctx.s, ctx.device
    key = s.extract_teachers[0]
    store = CacheStore.open(_extraction_cache(ctx, key))
    lay = store.layout
    labels = store.array("labels")[:].astype(np.int64)
    classes = len(store.meta.classes)
    student = create_student(s.student, classes).to(dev).to(memory_format=torch.channels_last)
    dims = Dims(student.dims(s.image_size)["feature"], lay.feature_dim, classes)
    module = TrainModule(student, create_method("fitnet", dims)).to(dev)
    opt = make_optimizer("adamw", module, 1e-3, 0.05)
    rows = np.ones(lay.n, bool)
    reps = labelled_repeats(rows, np.zeros_like(rows), None) * 4  # each row 4 times: a long enough epoch
    need = s.train_warmup + s.train_steps

    def cache_batches(epoch):
        cfg = StreamConfig(str(store.path), s.image_size, student.interpolation, epoch, 512, features=True)
        loader = make_loader(cfg, rank_shards(reps, lay.shard_size, 0, epoch, 0, 1), reps, labels, epoch,
                             s.student_batch, s.workers, pin_memory=dev.type == "cuda")
        return loader

    g = torch.Generator(device="cpu").manual_seed(0)
    synthetic = {"image": torch.randint(0, 256, (s.student_batch, 3, s.image_size, s.image_size), dtype=torch.uint8,
                                        generator=g).to(dev),
                 "feature": torch.randn(s.student_batch, lay.feature_dim, generator=g).to(dev),
                 "label": torch.randint(0, classes, (s.student_batch,), generator=g).to(dev)}
    runs = {"cache": [], "synthetic": []}
    ctx.peak_reset()
    assert s.student_batch * need <= reps.sum(), "the epoch is shorter than the steps measured"
    for epoch in range(s.repeats):
        runs["cache"].append(_train_steps(module, opt, cache_batches(epoch), dev, s.train_warmup, s.train_steps))
        runs["synthetic"].append(_train_steps(module, opt, iter(lambda: synthetic, None), dev, s.train_warmup,
                                              s.train_steps))
    return {"student": s.student, "image_size": s.image_size, "batch": s.student_batch, "workers": s.workers,
            "cache_img_per_s": _median(runs["cache"]), "synthetic_img_per_s": _median(runs["synthetic"]),
            "cache_over_synthetic": _median([c / y for c, y in zip(runs["cache"], runs["synthetic"])]),
            "peak_memory_gib": ctx.peak_gib()}


def part_compile(ctx: Context) -> dict:
    key = ctx.s.teachers[0][0]
    name, size = _spec(dict(ctx.s.teachers)[key])
    teacher = create_teacher(name, random_init=True, input_size=size).to(ctx.device).eval()
    teacher.tune(compile_mode=ctx.s.compile_mode, batch_size=ctx.s.batch)
    t = time.perf_counter()
    x = torch.randint(0, 256, (ctx.s.batch, 3, teacher.preprocess.input_size, teacher.preprocess.input_size),
                      dtype=torch.uint8, device=ctx.device)
    with _autocast(ctx.device):
        teacher(x)
    _sync(ctx.device)
    compile_s = time.perf_counter() - t
    rates = model_only_rate(ctx, teacher)
    eager = ctx.results.get("model_only", {}).get(key, {}).get("bf16_img_per_s", {}).get("median")
    return {"mode": ctx.s.compile_mode, "compile_s": compile_s, "bf16_img_per_s": _median(rates),
            "over_eager": statistics.median(rates) / eager if eager else None}


def part_pipeline(ctx: Context) -> dict:
    import bench

    a = type("Args", (), {"pipeline_images": ctx.s.pipeline_images, "pipeline_views": ctx.s.views,
                          "repeats": 2})()
    folder = ctx.tmp / "pipeline"
    folder.mkdir(exist_ok=True)
    return bench.bench_pipeline(a, folder)


PARTS = {"environment": part_environment, "model_only": part_model_only, "extraction": part_extraction,
         "replay": part_replay, "training": part_training, "pipeline": part_pipeline, "compile": part_compile}


def run_suite(s: Settings, device: torch.device, tmp: Path, out_json: Path, out_md: Path, command: str,
              parts: list[str] | None = None) -> dict:
    """Run the parts in order within `s.deadline_s`, writing the results files after each."""
    start = time.perf_counter()
    results = {"command": command, "settings": asdict(s), "targets": TARGETS, "parts": {}}

    def write():
        results["wall_s"] = time.perf_counter() - start
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=str))
        out_md.write_text(render_gpu(results))

    ctx = Context(s, device, tmp, results, write)
    for name in parts or list(PARTS):
        least, most = s.part_s[name]
        left = s.deadline_s - (time.perf_counter() - start)
        if left < least:
            results["parts"][name] = {"status": "skipped", "why": f"{left:.0f} s left of the deadline, needs {least}"}
            write()
            continue
        t = time.perf_counter()
        try:
            with time_box(min(most, left)):
                results[name] = PARTS[name](ctx)
            results["parts"][name] = {"status": "ok", "seconds": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
            results["parts"][name] = {"status": "failed" if not isinstance(e, PartTimeout) else "timed out",
                                      "seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc(limit=6)}
        print(f"{name}: {results['parts'][name]['status']} ({time.perf_counter() - t:.0f} s)", flush=True)
        write()
    return results


def _verdict(value, target, op=">="):
    if value is None:
        return ""
    ok = value >= target if op == ">=" else value <= target
    return "meets" if ok else "misses"


def render_gpu(r: dict) -> str:
    env = r.get("environment", {})
    lines = [f"# GPU set: {env.get('gpu', env.get('device', '?'))}", "",
             f"`{r['command']}` ({r.get('wall_s', 0) / 60:.1f} min; torch {env.get('torch', '?')}, CUDA "
             f"{env.get('cuda', '?')}, {env.get('cores', '?')} cores). Random-init teachers (speed does not "
             "depend on the weights); real-photo JPEGs from installed packages. Medians (min–max) over "
             "interleaved repeats.", "", "| measure | median | min–max (n) | target | verdict |",
             "| --- | --- | --- | --- | --- |"]

    def row(name, m, target=None, fmt="{:,.0f}"):
        if not m:
            return
        t = f">= {target:g}" if target is not None else ""
        lines.append(f"| {name} | {fmt.format(m['median'])} | {fmt.format(m['min'])}–{fmt.format(m['max'])} "
                     f"({m['n']}) | {t} | {_verdict(m['median'], target) if target is not None else ''} |")

    for key, e in r.get("model_only", {}).items():
        if key != "ladder":
            row(f"model-only img/s, {e['teacher']} bf16, batch {e['batch']}", e["bf16_img_per_s"],
                TARGETS["model_only_img_per_s"])
    for key, e in r.get("extraction", {}).items():
        for decode in ("workers", "device"):
            if decode in e:
                row(f"extraction img/s, {key}, V={e['views']}, decode in {decode}", e[decode]["img_per_s"])
                row(f"extraction / model-only, {key}, decode in {decode}", e[decode]["over_model_only"],
                    TARGETS["extraction_over_model_only"], "{:.3f}")
                row(f"the same, loader start-up excluded ({key}, decode in {decode})",
                    e[decode].get("steady_over_model_only"), TARGETS["extraction_over_model_only"], "{:.3f}")
                row(f"share of the pass waiting for the image stream, {key}, decode in {decode}",
                    e[decode]["waited_share"], None, "{:.3f}")
                if decode == "device":
                    row(f"share of the pass this thread spent decoding and replaying on the device, {key}",
                        e[decode].get("replaying_share"), None, "{:.3f}")
    t = r.get("training")
    if t:
        row(f"training img/s from the cache, {t['student']} at {t['image_size']} px", t["cache_img_per_s"])
        row("training img/s on synthetic tensors on the GPU", t["synthetic_img_per_s"])
        row("training from the cache / synthetic", t["cache_over_synthetic"], TARGETS["training_cache_over_synthetic"],
            "{:.3f}")
    lines += _details(r)
    return "\n".join(lines) + "\n"


def _details(r: dict) -> list[str]:
    lines = []
    peaks = {k: e.get("peak_memory_gib") for k, e in r.get("model_only", {}).items() if isinstance(e, dict)}
    peaks.update({f"extraction {k}": e.get("peak_memory_gib") for k, e in r.get("extraction", {}).items()})
    if r.get("training"):
        peaks["training"] = r["training"].get("peak_memory_gib")
    if any(v is not None for v in peaks.values()):
        lines += ["", "Peak GPU memory (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items() if v is not None)]
    ladder = r.get("model_only", {}).get("ladder")
    if ladder:
        lines += ["", f"Model-only steps, {ladder['teacher']}: " + ", ".join(
            f"{k} {v['median']:,.0f} img/s" for k, v in ladder["img_per_s"].items())]
    c = r.get("compile")
    if c:
        lines += [f"torch.compile (mode {c['mode']}): {c['bf16_img_per_s']['median']:,.0f} img/s"
                  + (f", {c['over_eager']:.2f}x eager" if c.get("over_eager") else "")
                  + f"; first call (compilation) {c['compile_s']:.0f} s"]
    att = r.get("environment", {}).get("attention")
    if att:
        lines += ["", "Attention blocks on F.scaled_dot_product_attention (fused / unfused): " + ", ".join(
            f"{k} {v['fused']} / {v['unfused']}" for k, v in att.items())]
    rp = r.get("replay")
    if rp:
        v = rp["views_vs_cpu_replay"]
        lines += ["", f"Device decode ({rp.get('device_decode', '?')}) + replay alone: {rp['device_views_per_s']:,.0f} "
                  f"views/s over {rp['views']} "
                  f"views. Pixels against the CPU replay of the same views: max {v['max']} levels, "
                  f"mean {v['mean']:.4f}, "
                  f"{100 * v['share_differing']:.3f}% differ, {100 * v['share_over_1']:.4f}% by more than 1."]
        if "decode_vs_cpu" in rp:
            d = rp["decode_vs_cpu"]
            lines[-1] += (f" The decoded JPEGs alone (nvJPEG against libjpeg-turbo): max {d['max']}, mean "
                          f"{d['mean']:.4f}, {100 * d['share_differing']:.2f}% of values differ.")
    for k, e in r.get("first_runs", {}).items():
        lines.append(f"First extraction, {k}: {e['images']} images in {e['seconds']:.0f} s ({e['note']}).")
    import bench

    lines += bench.render_pipeline(r.get("pipeline"))
    parts = r.get("parts", {})
    if parts:
        lines += ["", "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
        for name, p in parts.items():
            lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} | {p.get('error', p.get('why', ''))} |")
    return lines
