"""Side-by-side speed measurements, as ratios taken in one run (machines are noisy).

    python benchmarks/bench.py [--quick] [--device cpu|cuda] [--teacher NAME] [--student NAME]

Writes benchmarks/results/<machine>.json and .md. Each pair is measured back to back, repeated,
and summarised by medians.
"""
from __future__ import annotations

import argparse
import json
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

from pipeline.engine import TrainModule, make_optimizer  # noqa: E402
from pipeline.loader import StreamConfig, labelled_repeats, make_loader, rank_shards  # noqa: E402
from pipeline.methods import create_method  # noqa: E402
from pipeline.methods.base import Dims  # noqa: E402
from pipeline.store import CacheStore, Layout  # noqa: E402
from pipeline.students import create_student  # noqa: E402
from pipeline.teachers import create_teacher  # noqa: E402
from stages import extract  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_extraction(a, tmp: Path) -> dict:
    """Extraction img/s (pack + decode + views + teacher + writes) vs the teacher alone on in-memory images."""
    out = {}
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", a.n), ("size", 96)), teacher=a.teacher,
                                random_init=True, views=a.views, shard_size=256, batch_size=a.batch, workers=a.workers,
                                device=a.device, progress=False, out=str(tmp / "cache"))
    teacher = create_teacher(a.teacher, random_init=True).to(a.device)
    size = teacher.preprocess.input_size
    x = torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8, device=a.device)
    steps = max(1, a.n * a.views // a.batch)

    def model_only():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device == "cuda"):
            for _ in range(steps):
                teacher(x)
        if a.device == "cuda":
            torch.cuda.synchronize()

    model_only()  # warm-up
    t_model = median_time(model_only, 3)
    t_extract = []
    for _ in range(2):
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        t = time.perf_counter()
        extract.run(cfg)
        t_extract.append(time.perf_counter() - t)
    t_ex = statistics.median(t_extract)
    out["model_only_views_per_s"] = steps * a.batch / t_model
    out["extraction_views_per_s"] = a.n * a.views / t_ex
    out["extraction_over_model_only"] = out["extraction_views_per_s"] / out["model_only_views_per_s"]
    store = CacheStore.open(tmp / "cache")
    done = int((store.status() == 1).sum()) * a.views
    out["bytes_per_view"] = {n: store.nbytes_on_disk(n) / done for n in ("features", "logits", "tokens")
                             if store.has(n)}
    out["bytes_per_view"]["raw_fp16_features_plus_logits"] = 2 * (store.layout.feature_dim + store.layout.num_classes)
    return out


def bench_ranks(a, tmp: Path) -> dict:
    """Extraction wall time with 2 ranks (torchrun, gloo) vs 1 rank, same data, process start included."""
    args = ["extract", "--dataset", "synthetic", "--dataset-opt", f"n={a.n}", "--teacher", a.teacher, "--random-init",
            "--views", str(a.views), "--shard-size", "128", "--workers", "0", "--no-progress",
            "--device", a.device]
    times = {}
    for ranks in (1, 2):
        out = tmp / f"ranks{ranks}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(ROOT / "cli.py"), *args, "--out", str(out)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times[ranks] = time.perf_counter() - t
    return {"one_rank_s": times[1], "two_ranks_s": times[2], "two_over_one_speedup": times[1] / times[2]}


def bench_cache_reads(a, tmp: Path) -> dict:
    """Chunk-aligned shard reads vs per-sample random reads of a D=1024 fp16 feature array."""
    n, v, d, s = a.read_rows, 4, 1024, 1024
    lay = Layout(n=n, views=v, feature_dim=d, num_classes=0, token_grid=0, token_dim=0, shard_size=s, params=10)
    static = {"labels": np.zeros(n, np.int32), "domains": np.zeros(n, np.int16), "splits": np.zeros(n, np.int8),
              "keys": np.array([str(i) for i in range(n)])}
    store = CacheStore.create(tmp / "reads", lay, {}, static)
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


def bench_distill(a, tmp: Path) -> dict:
    """Epoch time: distil from the cache vs supervised only vs an online teacher on the same views."""
    cache = tmp / "cache"
    store = CacheStore.open(cache)
    lay = store.layout
    labels = store.array("labels")[:].astype(np.int64)
    train = store.array("splits")[:] == 0
    reps = labelled_repeats(train, np.zeros_like(train), None)
    student = create_student(a.student, len(store.attrs["dataset"]["classes"])).to(a.device)
    dims = Dims(student.dims(a.image_size)["feature"], lay.feature_dim, student.model.num_classes)
    teacher = create_teacher(a.teacher, random_init=True).to(a.device)
    t_size = teacher.preprocess.input_size
    results = {}
    for mode in ("supervised", "cache", "online"):
        method = create_method("supervised" if mode == "supervised" else "fitnet", dims).to(a.device)
        module = TrainModule(student, method).to(a.device)
        opt = make_optimizer("adamw", module.parameters(), 1e-3, 0.0)
        # the supervised baseline reads no teacher rows at all: images and labels only
        cfg = StreamConfig(str(cache), a.image_size, student.interpolation, 0, 256, features=mode != "supervised")

        def epoch():
            loader = make_loader(cfg, rank_shards(reps, lay.shard_size, 0, 0, 0, 1), reps, labels, 0, a.batch,
                                 a.workers)
            for batch in loader:
                images = batch["image"].to(a.device)
                feats = batch["feature"].to(a.device) if "feature" in batch else None
                if mode == "online":  # the teacher runs on every step instead of being read from the cache
                    with torch.no_grad():
                        big = torch.nn.functional.interpolate(images.float(), size=t_size, mode="bilinear")
                        feats = teacher(big.clamp(0, 255).to(torch.uint8))["features"]
                parts = module(images, feats, batch["label"].to(a.device))
                opt.zero_grad()
                parts["loss"].backward()
                opt.step()
            if a.device == "cuda":
                torch.cuda.synchronize()

        epoch()  # warm-up
        results[mode] = median_time(epoch, a.repeats)
    return {"epoch_s": results, "cache_over_supervised": results["cache"] / results["supervised"],
            "online_over_cache_speedup": results["online"] / results["cache"]}


SECTIONS = {"extraction": bench_extraction, "distill": bench_distill, "cache_reads": bench_cache_reads,
            "ranks": bench_ranks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (a few minutes on 2 cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher", default="test_vit")
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only these sections (repeatable); prints, writes no results file")
    a = p.parse_args(argv)
    a.n, a.views, a.batch, a.workers = (256, 2, 64, 1) if a.quick else (1024, 4, 64, 2)
    a.image_size, a.repeats, a.read_rows = 64, (2 if a.quick else 3), (8192 if a.quick else 32768)
    machine = "gpu-" + torch.cuda.get_device_name().replace(" ", "-") if a.device == "cuda" else \
        f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    results = {"machine": machine, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in SECTIONS.items():
            if a.only and name not in a.only:
                continue
            t = time.perf_counter()
            results[name] = fn(a, tmp)
            print(f"{name}: {json.dumps(results[name])} ({time.perf_counter() - t:.0f} s)", flush=True)
    if a.only:
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}.json").write_text(json.dumps(results, indent=2))
    (out / f"{machine}.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    e, d, c, k = r["extraction"], r["distill"], r["cache_reads"], r["ranks"]
    rows = [
        ("distill-from-cache epoch / supervised-only epoch", f"{d['cache_over_supervised']:.3f}", "<= 1.10"),
        ("online-teacher epoch / distill-from-cache epoch", f"{d['online_over_cache_speedup']:.2f}x", "speed-up"),
        ("extraction views/s / model-only views/s", f"{e['extraction_over_model_only']:.3f}", ">= 0.90"),
        ("chunk-aligned cache reads, views/s (D=1024 fp16)", f"{c['aligned_views_per_s']:,.0f}", ">= 100k"),
        ("per-sample random reads, views/s", f"{c['random_views_per_s']:,.0f}", "contrast"),
        ("extraction 2 ranks / 1 rank (speed-up, process start included)", f"{k['two_over_one_speedup']:.2f}x", ""),
    ]
    lines = [f"# {r['machine']}", "", f"`{r['command']}`", "", "| pair | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    lines += ["", "bytes per view on disk: " + ", ".join(f"{k_} {v:.0f}" for k_, v in e["bytes_per_view"].items()),
              "", f"epoch seconds: {json.dumps({k_: round(v, 2) for k_, v in d['epoch_s'].items()})}; "
              f"extraction {e['extraction_views_per_s']:.0f} views/s, model only {e['model_only_views_per_s']:.0f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
