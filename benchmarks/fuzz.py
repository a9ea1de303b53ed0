"""Fuzz pass: random byte flips and truncations in tar shards and in every Zarr array of a cache, then repair.

    python benchmarks/fuzz.py                 # 100 trials: benchmarks/results/fuzz.md, fuzz/trials.json
    python benchmarks/fuzz.py --trials 20 --seed 1

Each trial copies a small clean cache, damages one file (a tar shard, a shard file of an array, or an
array's zarr.json) and then runs, each in its own process, what a user would run:
  1. `cli.py info --cache C --verify` (exit 0: nothing found, 1: damage named, 2: refused at open);
  2. the training reader: `distill`'s cache checks, then every row streamed as `distill` streams it
     (features, logits, images), compared with the clean cache's stream.
  3. `cli.py extract ... --repair`, then verify and the training reader again.
A crash is a process killed by a signal or a traceback on stderr. Every trial must end as
"detected" (verify names it or refuses the cache) or "harmless" (verify passes and the training
reader sees exactly the clean data); "undetected" (verify passes, data differs) and crashes must be 0.
After the repair, every trial must read as the clean cache (verify passes, the same rows, the same
fingerprint): "repaired"; the one file nothing can be derived from is the root zarr.json (it holds the
cache's identity): damage to it must be refused by the repair, naming it, with the cache left unchanged
("refused"). "unrepaired" must be 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
N, S = 96, 8
EXTRACT = ["extract", "--dataset", "synthetic", "--dataset-opt", f"n={N}", "--teacher", "test_vit", "--random-init",
           "--views", "2", "--shard-size", str(S), "--batch-size", "6", "--workers", "0", "--no-progress"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def stream_all(cache: str) -> dict:
    """What training would read: distill's open checks, then every row of every shard (all views' features
    and logits, and the decoded clean image), as digests per row."""
    import hashlib

    import numpy as np

    from kdcache.train.loader import CacheStream, StreamConfig
    from kdcache.train.inputs import open_cache

    store = open_cache(cache)
    reps = np.ones(store.layout.n, np.int32)
    cfg = StreamConfig(cache, image_size=32, clean_only=True, logits=True)
    out = {}
    for s in CacheStream(cfg, list(range(store.layout.num_shards)), reps, store.array("labels")[:], 0):
        h = hashlib.sha256(s["image"].numpy().tobytes() + s["feature"].numpy().tobytes()
                           + s["logits"].numpy().tobytes() + str(s["label"]).encode())
        out[str(s["row"])] = h.hexdigest()[:16]
    return out


def _reader(cache: str) -> None:
    """Subprocess entry: prints one JSON line {refused: msg} or {rows: {row: digest}, fingerprint: ...}."""
    from kdcache.cache.format import CacheError
    from kdcache.cache.store import CacheStore

    try:
        rows = stream_all(cache)
        fingerprint = CacheStore.open(cache).fingerprint()  # what distill binds its run to
    except (CacheError, ValueError) as e:
        print(json.dumps({"refused": str(e)[:300]}))
        return
    print(json.dumps({"rows": rows, "fingerprint": fingerprint}))


def _tree(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _targets(cache: Path) -> list[Path]:
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    return sorted(files)


def _damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "empty file left as is"
    if rng.random() < 0.5:
        n = rng.randint(1, 8)
        for _ in range(n):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        path.write_bytes(bytes(data))
        return f"{n} byte flip(s)"
    keep = rng.randrange(len(data))
    path.write_bytes(bytes(data[:keep]))
    return f"truncated to {keep} of {len(data)} bytes"


def _run(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        _reader(args.reader)
        return
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
    clean = work / "clean"
    rc, _, err = _run([str(ROOT / "cli.py"), *EXTRACT, "--out", str(clean)])
    assert rc == 0, err
    rc, out, err = _run([str(Path(__file__)), "--reader", str(clean)])
    clean_read = json.loads(out.splitlines()[-1])
    reference, clean_fingerprint = clean_read["rows"], clean_read["fingerprint"]
    targets = _targets(clean)
    groups = sorted({p.relative_to(clean).parts[0] for p in targets})
    trials = []
    start = time.perf_counter()
    for t in range(args.trials):
        group = groups[t % len(groups)]  # every array and the tar shards, in turn
        victim_rel = rng.choice([p.relative_to(clean) for p in targets if p.relative_to(clean).parts[0] == group])
        cache = work / f"trial-{t:03d}"
        shutil.copytree(clean, cache)
        how = _damage(cache / victim_rel, rng)
        rc_v, out_v, err_v = _run([str(ROOT / "cli.py"), "info", "--cache", str(cache), "--verify"])
        rc_r, out_r, err_r = _run([str(Path(__file__)), "--reader", str(cache)])
        crashed = rc_v < 0 or rc_r < 0 or "Traceback" in err_v + err_r or rc_r != 0
        reader = json.loads(out_r.splitlines()[-1]) if rc_r == 0 and out_r.strip() else {}
        same = reader.get("rows") == reference
        detected = rc_v in (1, 2)
        outcome = "crash" if crashed else "detected" if detected else "harmless" if same else "undetected"
        before = _tree(cache)
        rc_x, _, err_x = _run([str(ROOT / "cli.py"), *EXTRACT, "--out", str(cache), "--repair"])
        rc_v2, out_v2, err_v2 = _run([str(ROOT / "cli.py"), "info", "--cache", str(cache), "--verify"])
        rc_r2, out_r2, err_r2 = _run([str(Path(__file__)), "--reader", str(cache)])
        after = json.loads(out_r2.splitlines()[-1]) if rc_r2 == 0 and out_r2.strip() else {}
        if rc_v2 == 0 and after.get("rows") == reference and after.get("fingerprint") == clean_fingerprint:
            repair = "repaired"
        elif str(victim_rel) == "zarr.json" and rc_x == 2 and "zarr.json" in err_x and _tree(cache) == before:
            repair = "refused"
        else:
            repair = "unrepaired"
        if "Traceback" in err_x + err_v2 + err_r2:
            outcome = "crash"
        trials.append({"trial": t, "file": str(victim_rel), "damage": how, "verify_exit": rc_v,
                       "reader": "refused" if "refused" in reader else ("same" if same else "differs"),
                       "outcome": outcome, "repair": repair,
                       "repair_message": err_x.strip().splitlines()[-1][:200] if err_x.strip() else "",
                       "stderr": (err_v + err_r)[-600:] if crashed else "",
                       "message": (err_v.strip().splitlines() or [""])[-1][:200] if rc_v == 2 else
                       (out_v.strip().splitlines() or [""])[-1][:200]})
        print(f"[fuzz] {t + 1}/{args.trials} {victim_rel} ({how}): {outcome}, {repair}", flush=True)
        shutil.rmtree(cache)
    shutil.rmtree(work)
    counts = {k: sum(tr["outcome"] == k for tr in trials) for k in ("detected", "harmless", "undetected", "crash")}
    repairs = {k: sum(tr["repair"] == k for tr in trials) for k in ("repaired", "refused", "unrepaired")}
    refused = sum(tr["reader"] == "refused" for tr in trials)
    summary = {"trials": len(trials), "seed": args.seed, "counts": counts, "repairs": repairs, "reader_refused": refused,
               "seconds": round(time.perf_counter() - start, 1), "cpu_count": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz").mkdir(exist_ok=True)
    (RESULTS / "fuzz" / "trials.json").write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))
    by_group: dict[str, dict[str, int]] = {}
    for tr in trials:
        g = by_group.setdefault(Path(tr["file"]).parts[0], {})
        g[tr["outcome"]] = g.get(tr["outcome"], 0) + 1
        g[tr["repair"]] = g.get(tr["repair"], 0) + 1
    lines = ["# Fuzz pass: damaged caches", "",
             f"`python benchmarks/fuzz.py --trials {args.trials} --seed {args.seed}`: {len(trials)} trials, each a "
             "copy of a clean 96-image cache with one file damaged (random byte flips or a truncation), then "
             "`info --verify` and the training reader, each in its own process; then `extract --repair`, verify and the "
             "reader again.", "",
             f"**{counts['detected']} detected, {counts['harmless']} harmless, {counts['undetected']} undetected, "
             f"{counts['crash']} crashes**; the training reader refused the cache in {refused} trials "
             "(distill's cheap checks at start).", "",
             f"After `--repair`: **{repairs['repaired']} repaired** (verify passes, every row and the fingerprint "
             f"equal the clean cache's), {repairs['refused']} refused (the root zarr.json: the cache's identity, "
             f"which nothing can derive; the repair names it and changes no file), "
             f"**{repairs['unrepaired']} unrepaired**.", "",
             "| damaged | detected | harmless | undetected | crash | repaired | refused | unrepaired |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g, c in sorted(by_group.items()):
        lines.append(f"| {g} | {c.get('detected', 0)} | {c.get('harmless', 0)} | {c.get('undetected', 0)} | "
                     f"{c.get('crash', 0)} | {c.get('repaired', 0)} | {c.get('refused', 0)} | "
                     f"{c.get('unrepaired', 0)} |")
    lines += ["", "Detected: `info --verify` exits 1 naming the shard or array, or 2 refusing the cache at open. "
              "Harmless: verify passes and every row the training reader streams (image, features, logits, label) is "
              "identical to the clean cache's (e.g. a flip in tar padding, or in a shard of `reasons` that holds "
              "only empty strings).", ""]
    (RESULTS / "fuzz.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if counts["undetected"] or counts["crash"] or repairs["unrepaired"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
