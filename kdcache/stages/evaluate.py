"""Stage three: evaluate a distilled student against its teacher; measure, export, report."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch

from kdcache.scenario_heads import scenario_teacher_head
from kdcache.dist import device_for
from kdcache.files import writable
from kdcache.measure import count_macs, count_params, cpu_latency_ms, export_onnx, export_timm, topk_metrics
from kdcache.options import ConfigError, check_fields
from kdcache.report import write_report
from kdcache.run_files import epochs_recorded, damaged, read_tensors, resume_hint
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.students import create_student
from kdcache.train.engine import predict
from kdcache.train.inputs import run_cache, scenario_of
from kdcache.train.loader import StreamConfig, make_loader, rank_shards
from kdcache.train.run_dir import training_holder

from .config import read_config
from kdcache.schema import DistillConfig, EvaluateConfig

SUMMARY_KEYS = ("scenario_digest", "num_classes", "image_size")  # what evaluation reads from summary.json


def load_run(run_dir: Path) -> tuple[DistillConfig, dict]:
    """A finished run's config (through the typed loader: values coerced, an unknown key named) and its
    summary; CacheError naming the file that is missing or damaged."""
    holder = training_holder(run_dir)
    if holder:
        raise CacheError(f"run {run_dir} is still training ({holder}); evaluate it when that distill has finished")
    if not (run_dir / "summary.json").is_file() or not (run_dir / "student.safetensors").is_file():
        if (run_dir / "config.yaml").is_file():  # a run that began and stopped before its last epoch
            done = epochs_recorded(run_dir)
            raise CacheError(f"run {run_dir} has no finished student yet: its training stopped after {done} epoch(s); "
                             "finish it with `python cli.py distill --config "
                             f"{shlex.quote(str(run_dir / 'config.yaml'))} --resume --out {shlex.quote(str(run_dir))}`, "
                             "then evaluate it")
        raise CacheError(f"{run_dir} is not a finished distill run (no summary.json / student.safetensors); "
                         "run `python cli.py distill ...` (or --resume it) first")
    try:
        summary = json.loads((run_dir / "summary.json").read_bytes())
    except ValueError as e:
        raise CacheError(f"{run_dir / 'summary.json'} cannot be read ({e}); the run is damaged: distill it "
                         "again") from None
    if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
        raise CacheError(f"{run_dir / 'summary.json'} lacks {', '.join(SUMMARY_KEYS)}; the run is damaged: "
                         "distill it again")
    try:
        cfg = read_config(DistillConfig, run_dir / "config.yaml")
    except ConfigError as e:
        what = "it is missing" if not (run_dir / "config.yaml").is_file() else \
            str(e).removeprefix(f"{run_dir / 'config.yaml'}").lstrip(": ")
        raise damaged(run_dir / "config.yaml", what, "it holds the run's settings: write it again by resuming the run "
                      "with the flags it was trained with plus --resume --out " + shlex.quote(str(run_dir))) from None
    return cfg, summary


def student_logits(student, store: CacheStore, rows_mask: np.ndarray, image_size: int, cfg: EvaluateConfig,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the clean view (view 0) for the masked rows, in row order."""
    reps = rows_mask.astype(np.int32)
    labels = store.array("labels")[:].astype(np.int64)
    stream = StreamConfig(str(store.path), image_size, student.interpolation, clean_only=True, features=False)
    loader = make_loader(stream, rank_shards(reps, store.layout.shard_size, 0, 0, 0, 1, shuffle=False), reps,
                         labels, 0, cfg.batch_size, cfg.workers)
    logits, _, rows = predict(student.to(device), loader, device, progress=cfg.progress, total=int(reps.sum()))
    return logits, rows


def teacher_logits(store: CacheStore, scenario, rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """The teacher's clean-view logits for `rows`, from a head that saw only the scenario's labels."""
    head, info = scenario_teacher_head(store, scenario)
    mask = np.zeros(store.layout.n, bool)
    mask[rows] = True
    if head is None:
        return store.clean_view(mask, "logits"), info
    return head(torch.from_numpy(store.clean_view(mask))).numpy(), info


def _groups(rows, domains, splits, domain_names) -> dict[str, np.ndarray]:
    from kdcache.codes import SPLIT_NAMES

    d, s = domains[rows], splits[rows]
    groups = {}
    for di in np.unique(d):
        groups[domain_names[int(di)]] = d == di
        for si in np.unique(s[d == di]):
            groups[f"{domain_names[int(di)]}/{SPLIT_NAMES[int(si)]}"] = (d == di) & (s == si)
    return groups


def run(cfg: EvaluateConfig) -> Path:
    check_fields(cfg)
    run_dir = Path(cfg.run)
    device = device_for(cfg.device)
    dcfg, summary = load_run(run_dir)
    if not writable(run_dir):
        raise CacheError(f"run folder {run_dir} is not writable: evaluate writes report.json, report.md, "
                         "student.onnx and export/ into it; make it writable (or copy the run folder and pass the "
                         "copy as --run)")
    store = run_cache(run_dir, dcfg, summary, cfg.cache)
    scenario = scenario_of(store, dcfg)
    if scenario.digest() != summary["scenario_digest"]:
        raise CacheError(f"the cache at {store.path} no longer gives the scenario run {run_dir} was trained on; pass "
                         "--cache with the cache it was trained on")
    student = create_student(dcfg.student, summary["num_classes"])
    student.model.load_state_dict(read_tensors(run_dir / "student.safetensors", "write it again from the run's last "
                                               f"checkpoint: {resume_hint(run_dir)}"))
    size = summary["image_size"]

    logits, rows = student_logits(student, store, scenario.evaluation, size, cfg, device)
    labels = store.array("labels")[:][rows]
    groups = _groups(rows, store.array("domains")[:], store.array("splits")[:], list(store.meta.domains))
    t_logits, head_info = teacher_logits(store, scenario, rows)

    plain = student.model.eval().cpu()
    example = torch.randn(1, 3, size, size)
    report = {
        "run": run_dir.name, "student": dcfg.student, "method": dcfg.method, "scenario": scenario.description,
        "scenario_kind": dcfg.scenario, "teacher": store.meta.teacher, "image_size": size,
        "student_metrics": topk_metrics(logits, labels, groups),
        "teacher_metrics": topk_metrics(t_logits, labels, groups) | {"head": head_info},
        "params": count_params(plain), "macs": count_macs(plain, example),
        "latency_cpu_b1": cpu_latency_ms(plain, example, cfg.latency_repeats, threads=cfg.latency_threads),
        "preprocess": {"mean": (student.mean.flatten() / 255).tolist(), "std": (student.std.flatten() / 255).tolist(),
                       "interpolation": student.interpolation},
    }
    if cfg.latency_batch > 1:
        report["latency_cpu_batch"] = cpu_latency_ms(plain, example, cfg.latency_repeats, threads=cfg.latency_threads,
                                                     batch=cfg.latency_batch)
    if cfg.onnx:
        report["onnx"] = export_onnx(plain, example, run_dir / "student.onnx")
    pre = report["preprocess"]
    report["export"] = export_timm(plain, run_dir / "export", list(store.meta.classes), size,
                                   pre["mean"], pre["std"], pre["interpolation"],
                                   run_dir / "student.onnx" if cfg.onnx else None)
    write_report(run_dir, report)
    return run_dir
