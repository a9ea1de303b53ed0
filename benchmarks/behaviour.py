"""Digests of what the pipeline produces, to show that a change of structure changes no byte.

    python benchmarks/behaviour.py OUT.json            # extract two small caches, train every method seeded
    python benchmarks/behaviour.py OUT.json --against BEFORE.json   # and compare: exit 1 on any difference

Two caches of generated images (a CNN teacher with pooled tokens and a probe head; a ViT teacher with int8
features and two view policies' worth of options), every array of each hashed (zarr values, not files);
then one seeded run of every method on the first cache (ssl and uda scenarios), hashing the student's
weights, the method's state and each line of metrics.jsonl without its timings. One thread, no workers:
the digests depend on the instruction set and nothing else.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

TIMING_KEYS = ("seconds", "time", "per_s", "_s", "elapsed", "throughput", "wall")


def digest_arrays(path: Path) -> dict[str, str]:
    out = {}
    root = zarr.open_group(str(path), mode="r")

    def walk(group, prefix):
        for name, arr in sorted(group.arrays()):
            h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr[...]).tobytes())
            out[prefix + name] = h.hexdigest()[:16]
        for name, sub in sorted(group.groups()):
            walk(sub, prefix + name + "/")

    walk(root, "")
    return out


def digest_run(run: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(run.glob("*.safetensors")):
        tensors = load_file(str(f))
        h = hashlib.sha256()
        for k in sorted(tensors):
            h.update(k.encode() + str(tensors[k].dtype).encode() + np.ascontiguousarray(tensors[k]).tobytes())
        out[f.name] = h.hexdigest()[:16]
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines.append(_strip(rec))
    out["metrics.jsonl"] = hashlib.sha256(json.dumps(lines, sort_keys=True).encode()).hexdigest()[:16]
    return out


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def collect(tmp: Path, row_order: str | None = None) -> dict:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_teacher import train_tiny_teacher

    from kdcache.stages import distill, extract

    result = {}
    weights = train_tiny_teacher(tmp / "teacher.safetensors", classes=5)
    cnn = extract.run(extract.ExtractConfig(
        dataset="synthetic", dataset_options=(("n", 160), ("classes", 5), ("domains", 2)), teacher="test_efficientnet",
        teacher_weights=str(weights), teacher_input_size=48, views=3, tokens=2, shard_size=64, batch_size=32,
        workers=0, out=str(tmp / "cnn"), progress=False, row_order=row_order))
    vit = extract.run(extract.ExtractConfig(
        dataset="synthetic", dataset_options=(("n", 96), ("classes", 4)), teacher="test_vit", random_init=True,
        teacher_input_size=32, views=2, head="probe", feature_dtype="int8", shard_size=48, batch_size=16,
        workers=0, out=str(tmp / "vit"), progress=False, row_order=row_order))
    result["cache cnn"] = digest_arrays(cnn)
    result["cache vit"] = digest_arrays(vit)
    from kdcache.methods import list_methods

    for method in list_methods():
        for scenario, extra in (("ssl", dict(labels_per_class=3)), ("uda", dict(source=("domain0",), target=("domain1",)))):
            out = tmp / f"run-{method}-{scenario}"
            distill.run(distill.DistillConfig(
                cache=str(cnn), student="test_efficientnet", image_size=32, method=method, scenario=scenario,
                epochs=2, batch_size=16, lr=3e-3, workers=0, seed=3, out=str(out), progress=False, **extra))
            result[f"run {method} {scenario}"] = digest_run(out)
        result["cache cnn after runs"] = digest_arrays(cnn)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="where to write the digests (JSON)")
    ap.add_argument("--against", help="digests written before the change: compare and report every difference")
    ap.add_argument("--row-order", choices=("shuffled", "sorted"),
                    help="the caches' row order (default: extract's, shuffled); sorted gives the caches made before "
                         "rows were shuffled at extraction")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = collect(Path(tmp), a.row_order)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{sum(len(v) for v in result.values())} digests written to {a.out}")
    if a.against:
        before = json.loads(Path(a.against).read_text())
        diff = [f"{k}/{n}: {before.get(k, {}).get(n)} -> {result.get(k, {}).get(n)}"
                for k in sorted(set(before) | set(result))
                for n in sorted(set(before.get(k, {})) | set(result.get(k, {})))
                if before.get(k, {}).get(n) != result.get(k, {}).get(n)]
        print("\n".join(diff) if diff else f"identical to {a.against}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
