"""One training loop, losses in modules; evaluation; atomic checkpoints."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .measure import topk_metrics
from .methods import Method, TeacherBatch
from .students import Student


class TrainModule(nn.Module):
    """Student + method (+ a fixed teacher head when logits come from a refitted probe)."""

    def __init__(self, student: Student, method: Method, teacher_head: nn.Module | None = None):
        super().__init__()
        self.student, self.method, self.teacher_head = student, method, teacher_head

    def forward(self, images, features, labels, logits=None, tokens=None) -> dict[str, torch.Tensor]:
        if self.teacher_head is not None:
            logits = self.teacher_head(features)
        out = self.student(images)
        return self.method(out, TeacherBatch(features, logits, tokens), labels)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_factor: float = 0.01):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown --optimizer {name!r}; choose adamw or sgd")


def _to(batch: dict, device, channels_last: bool):
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    get = lambda k: batch[k].to(device, non_blocking=True) if k in batch else None  # noqa: E731
    return images, get("feature"), get("label"), get("logits"), get("tokens")


def train_one_epoch(module: nn.Module, loader, optimizer, scheduler, device, max_steps: int | None = None,
                    amp: bool = False, channels_last: bool = False, desc: str = "train",
                    progress: bool = True, expected_steps: int | None = None) -> dict[str, float]:
    """One pass over the loader (or `max_steps` batches); returns mean loss parts and img/s."""
    module.train()
    sums: dict[str, float] = {}
    seen, steps, start = 0, 0, time.perf_counter()
    bar = tqdm(total=max_steps or expected_steps, unit="step", desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        images, features, labels, logits, tokens = _to(batch, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            parts = module(images, features, labels, logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        seen += len(images)
        for k, v in parts.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v.detach().float() * len(images)
        bar.update(1)
        if steps % 25 == 1 and not bar.disable:
            bar.set_postfix({"img/s": f"{seen / (time.perf_counter() - start):.0f}",
                             **{k: f"{float(v.detach()):.3f}" for k, v in parts.items()}})
    bar.close()
    elapsed = time.perf_counter() - start
    out = {k: float(v) / max(seen, 1) for k, v in sums.items()}
    out.update(images=seen, steps=steps, img_per_s=seen / max(elapsed, 1e-9), seconds=elapsed)
    return out


class LabelledFeatures:
    """Cached features (every view) of the labelled rows, for CustomKD's customisation phase.

    Held in memory when small (the usual semi-supervised case), else re-read shard by shard.
    """

    def __init__(self, store, labelled: np.ndarray, max_bytes: int = 1 << 30):
        self.store, self.labelled = store, labelled
        lay = store.layout
        self.in_memory = int(labelled.sum()) * lay.views * lay.feature_dim * 2 <= max_bytes
        self.labels = store.array("labels")[:]
        self._chunks = list(self._read()) if self.in_memory else None

    def _read(self):
        lay = self.store.layout
        for k in range(lay.num_shards):
            rows = lay.rows(k)
            mask = self.labelled[rows.start:rows.stop]
            if mask.any():
                feats = self.store.read("features", rows.start, rows.stop)[mask]  # chunk-aligned read
                yield feats, self.labels[rows.start:rows.stop][mask]

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(features [n*V, D] float32, labels [n*V]) of every view of every labelled row."""
        chunks = self._chunks if self.in_memory else list(self._read())
        f = np.concatenate([c[0].reshape(-1, c[0].shape[-1]) for c in chunks]).astype(np.float32)
        y = np.concatenate([np.repeat(c[1], c[0].shape[1]) for c in chunks])
        return f, y


def customisation_epoch(method: Method, student: Student, data: LabelledFeatures, optimizer, batch_size: int,
                        device, seed: int, epoch: int, min_steps: int = 100) -> dict[str, float]:
    """CustomKD phase A: train P_t on cached labelled features (no images), at least `min_steps` steps."""
    f, y = data.all()
    rng = np.random.default_rng([seed, epoch, 4])
    total, n, steps = 0.0, 0, 0
    student.eval()
    while steps < min_steps:
        order = rng.permutation(len(f))
        for i in range(0, len(f), batch_size):
            idx = order[i:i + batch_size]
            parts = method.customisation_loss(student.head, torch.from_numpy(f[idx]).to(device),
                                              torch.from_numpy(y[idx]).long().to(device))
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            total += float(parts["loss"].detach()) * len(idx)
            n, steps = n + len(idx), steps + 1
    return {"custom_ce": total / max(n, 1), "custom_samples": n, "custom_steps": steps}


@torch.no_grad()
def predict(student: Student, loader, device, channels_last: bool = False):
    """(logits, labels, rows) of every batch of the loader, in row order."""
    student.eval()
    out, labels, rows = [], [], []
    for batch in loader:
        images, _, y, _, _ = _to(batch, device, channels_last)
        out.append(student(images).logits.float().cpu())
        labels.append(y.cpu())
        rows.append(batch["row"])
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    logits, labels, rows = torch.cat(out).numpy(), torch.cat(labels).numpy(), torch.cat(rows).numpy()
    order = np.argsort(rows, kind="stable")
    return logits[order], labels[order], rows[order]


def evaluate(student: Student, loader, device, domains: np.ndarray, domain_names: list[str],
             channels_last: bool = False) -> dict:
    """Top-1 / top-5 on the clean view, overall and per domain."""
    logits, labels, rows = predict(student, loader, device, channels_last)
    if not len(rows):
        return {"top1": float("nan"), "top5": float("nan"), "n": 0, "per_domain": {}}
    groups = {domain_names[int(d)]: domains[rows] == d for d in np.unique(domains[rows])}
    metrics = topk_metrics(logits, labels, groups)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"], "per_domain": metrics["groups"]}


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, epoch: int, student: Student, method: Method, state: dict) -> Path:
    """checkpoints/epoch-NNNN/ is built under a temporary name and renamed; `latest` then points to it."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch-{epoch:04d}"
    tmp = ckpt_root / f".epoch-{epoch:04d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_tensors(student.model), str(tmp / "student.safetensors"))
    save_file(_tensors(method), str(tmp / "method.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(ckpt_root / "latest", lambda p: p.write_text(final.name))
    for name in ("student.safetensors", "method.safetensors"):  # the run's current artifacts
        _atomic_write(run_dir / name, lambda p, n=name: shutil.copyfile(final / n, p))
    for old in sorted(ckpt_root.glob("epoch-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = run_dir / "checkpoints" / latest.read_text().strip()
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return path, state


def restore(path: Path, student: Student, method: Method) -> None:
    student.model.load_state_dict(load_file(str(path / "student.safetensors")))
    method.load_state_dict(load_file(str(path / "method.safetensors")))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records of epochs after the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", -1) <= last_epoch:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    _atomic_write(path, lambda p: p.write_text("".join(x + "\n" for x in keep)))
