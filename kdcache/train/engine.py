"""One training loop, losses in modules; evaluation; atomic checkpoints."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..cache.format import outputs
from ..files import save_tensors, write_atomic
from ..options import ConfigError
from ..measure import topk_metrics
from ..methods import Method, TeacherBatch
from ..methods.base import MIX_KEYS
from ..progress import bar as progress_bar
from ..students import Student
from .loader import makeup_problem
from ..run_files import RunFileError, metric_lines, read_state, read_tensors, writing


class TrainModule(nn.Module):
    """Student + method (+ a fixed teacher head when logits come from a refitted probe).

    With an online `teacher`, the teacher runs on every step on the same replayed views (at its own
    input size) instead of the cached rows being read: the reference that measures what caching costs.
    """

    def __init__(self, student: Student, method: Method, teacher_head: nn.Module | None = None,
                 teacher: nn.Module | None = None, token_grid: int = 0):
        super().__init__()
        self.student, self.method, self.teacher_head = student, method, teacher_head
        self.teacher, self.token_grid = teacher, token_grid
        self.replay = None  # a ReplayCosine: online outputs against the cached ones the stream also reads

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: its batch-norm statistics never move
        return self

    def forward(self, images, features=None, labels=None, logits=None, tokens=None,
                teacher_images=None, rows=None, extra=None) -> dict[str, torch.Tensor]:
        if self.teacher is not None:
            with torch.no_grad():
                t = self.teacher(teacher_images, token_grid=self.token_grid)
                if self.replay is not None:
                    self.replay.add(t, features, logits, self.teacher_head)
            features, logits, tokens = t["features"], t.get("logits"), t.get("tokens")
        if self.teacher_head is not None:
            logits = self.teacher_head(features)
        out = self.student(images)
        return self.method(out, TeacherBatch(features, logits, tokens, rows, extra or {}), labels)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_factor: float = 0.01):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(name: str, params, lr: float, weight_decay: float, decay_norm_bias: bool = False):
    """AdamW or SGD (Nesterov, momentum 0.9) over the trainable parameters, from timm's optimiser factory
    (`timm.optim.create_optimizer_v2`). By default norm weights and biases get no weight decay (timm's
    parameter groups, as timm's recipes train); `decay_norm_bias=True` decays every trainable parameter,
    the setting of runs made before this default. `params` is a module, or an iterable of parameters
    (then every one is decayed: without the module, norms and biases cannot be told apart)."""
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if isinstance(params, nn.Module) and not decay_norm_bias:
        target = params  # the factory groups the module's trainable parameters by decay
    else:
        trainable = params.parameters() if isinstance(params, nn.Module) else params
        target = [p for p in trainable if p.requires_grad]
    extra = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    return create_optimizer_v2(target, name, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=not decay_norm_bias, **extra)


def _to(batch: dict, device, channels_last: bool) -> dict:
    """The batch on the device, named as TrainModule.forward takes it."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    names = {"feature": "features", "label": "labels", "logits": "logits", "tokens": "tokens",
             "teacher_image": "teacher_images", "row": "rows"}
    out = {"images": images, **{arg: batch[k].to(device, non_blocking=True) for k, arg in names.items() if k in batch}}
    extra = {k: batch[k].to(device, non_blocking=True) for k in (*outputs(), *MIX_KEYS)
             if k in batch and k not in names}
    return dict(out, extra=extra) if extra else out


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step and the options to look at."""


def _check_finite(first_bad: torch.Tensor, desc: str) -> None:
    bad = int(first_bad)  # one host sync, every CHECK_EVERY steps
    if bad >= 0:
        raise TrainingDiverged(f"{desc}: the loss became non-finite (NaN or inf) at step {bad + 1}; training stopped "
                               "and the last checkpoint is kept. Likely causes: --lr too high, or a --method-opt "
                               "temperature or weight out of its useful range")


CHECK_EVERY = 25


def train_one_epoch(module: nn.Module, loader, optimizer, scheduler, device, max_steps: int | None = None,
                    amp: bool = False, channels_last: bool = False, desc: str = "train",
                    progress: bool = True, expected_steps: int | None = None,
                    after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over the loader (or `max_steps` batches); returns mean loss parts and img/s. `after_step` runs
    after each optimiser step (the averaged student's update)."""
    module.train()
    sums: dict[str, float] = {}
    seen, steps, start = 0, 0, time.perf_counter()
    bar = progress_bar(max_steps or expected_steps, "step", desc, progress)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, kept on the device
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        inputs = _to(batch, device, channels_last)
        images = inputs["images"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            parts = module(**inputs)
        optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(parts["loss"].detach())
        first_bad = torch.where(~finite & (first_bad < 0), torch.full_like(first_bad, steps), first_bad)
        if steps % CHECK_EVERY == CHECK_EVERY - 1:
            _check_finite(first_bad, desc)
        parts["loss"].backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        steps += 1
        seen += len(images)
        for k, v in parts.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v.detach().float() * len(images)
        bar.update(1)
        if steps % 25 == 1 and not bar.disable:
            bar.set_postfix({"img/s": f"{seen / (time.perf_counter() - start):.0f}",
                             **{k: f"{float(v.detach()):.3f}" for k, v in parts.items()}})
    bar.close()
    _check_finite(first_bad, desc)
    elapsed = time.perf_counter() - start
    out = {k: float(v) / max(seen, 1) for k, v in sums.items()}
    out.update(images=seen, steps=steps, img_per_s=seen / max(elapsed, 1e-9), seconds=elapsed)
    return out


@dataclass(frozen=True)
class FitPlan:
    """What `fit` runs: the epochs left, the steps in each, where evaluation falls, and this rank."""

    epochs: int
    start_epoch: int
    steps_per_epoch: int
    eval_every: int = 0  # 0: evaluate after the last epoch only
    rank: int = 0
    world: int = 1
    amp: bool = False
    channels_last: bool = False
    progress: bool = True
    eval_total: int | None = None

    def evaluates(self, epoch: int) -> bool:
        return epoch + 1 == self.epochs or bool(self.eval_every and (epoch + 1) % self.eval_every == 0)


def fit(module: TrainModule, train_module: nn.Module, optimizer, scheduler, device, plan: FitPlan,
        train_loader: Callable[[int], object], eval_loader: Callable[[], object], eval_groups: tuple,
        before_epoch: Callable[[int], dict], after_epoch: Callable[[int, dict], None],
        barrier: Callable[[], None] = lambda: None, end_epoch: Callable[[int], dict] = lambda epoch: {},
        ema=None) -> None:
    """The epoch loop: the method's phase, one training pass, the method's `end_epoch`, evaluation when the
    plan says, then `after_epoch(epoch, record)` (metrics and checkpoint, by rank 0). `train_module` is `module` or its
    DistributedDataParallel wrapper; `eval_groups` is (domains per row, domain names). With an averaged student
    (`ema`, kdcache/train/ema.py) it is updated after every step and is the student evaluated (`eval`); the trained
    weights are evaluated too (`eval_trained`)."""
    update = (lambda: ema.update(module.student)) if ema is not None else None
    for epoch in range(plan.start_epoch, plan.epochs):
        record: dict = {"epoch": epoch}
        record.update(before_epoch(epoch))
        loader = train_loader(epoch)
        stats = train_one_epoch(train_module, loader, optimizer, scheduler, device,
                                max_steps=plan.steps_per_epoch if plan.world > 1 else None, amp=plan.amp,
                                channels_last=plan.channels_last, desc=f"epoch {epoch + 1}/{plan.epochs}",
                                progress=plan.progress and plan.rank == 0, expected_steps=plan.steps_per_epoch,
                                after_step=update)
        record.update(stats, lr=scheduler.get_last_lr()[0])
        makeup = loader.makeup() if hasattr(loader, "makeup") else {}
        if makeup:
            record["batch_makeup"] = makeup
            problem = makeup_problem(makeup)
            if problem and plan.rank == 0:
                print(f"warning: epoch {epoch + 1}: {problem}; the stream mixes too few shards (raise --interleave, "
                      "or extract the cache again: a new cache's rows are written in a shuffled order)",
                      file=sys.stderr)
        record.update(end_epoch(epoch))
        if plan.rank == 0 and plan.evaluates(epoch):
            exported = module.student if ema is None else ema.student
            record["eval"] = evaluate(exported, eval_loader(), device, *eval_groups, plan.channels_last,
                                      progress=plan.progress, total=plan.eval_total)
            if ema is not None:
                record["eval_trained"] = evaluate(module.student, eval_loader(), device, *eval_groups,
                                                  plan.channels_last, progress=False, total=plan.eval_total)
        after_epoch(epoch, record)
        barrier()


@torch.no_grad()
def predict(student: Student, loader, device, channels_last: bool = False, progress: bool = False,
            total: int | None = None, desc: str = "evaluate"):
    """(logits, labels, rows) of every batch of the loader, in row order."""
    student.eval()
    out, labels, rows = [], [], []
    with progress_bar(total, "img", desc, progress) as bar:
        for batch in loader:
            inputs = _to(batch, device, channels_last)
            out.append(student(inputs["images"]).logits.float().cpu())
            labels.append(inputs["labels"].cpu())
            rows.append(batch["row"])
            bar.update(len(batch["row"]))
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    logits, labels, rows = torch.cat(out).numpy(), torch.cat(labels).numpy(), torch.cat(rows).numpy()
    order = np.argsort(rows, kind="stable")
    return logits[order], labels[order], rows[order]


def evaluate(student: Student, loader, device, domains: np.ndarray, domain_names: list[str],
             channels_last: bool = False, progress: bool = False, total: int | None = None) -> dict:
    """Top-1 / top-5 on the clean view, overall and per domain."""
    logits, labels, rows = predict(student, loader, device, channels_last, progress, total)
    if not len(rows):
        return {"top1": float("nan"), "top5": float("nan"), "n": 0, "per_domain": {}}
    groups = {domain_names[int(d)]: domains[rows] == d for d in np.unique(domains[rows])}
    metrics = topk_metrics(logits, labels, groups)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"], "per_domain": metrics["groups"]}


# ----------------------------------------------------------------------------- checkpoints


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, epoch: int, student: Student, method: Method, state: dict, ema=None) -> Path:
    """checkpoints/epoch-NNNN/ is built under a temporary name and renamed; `latest` then points to it. A write
    that fails (a full disk) removes what it built, and says which file it could not write. With an averaged
    student (`ema`) its weights are `ema.safetensors` there, and the run's exported `student.safetensors`."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch-{epoch:04d}"
    tmp = ckpt_root / f".epoch-{epoch:04d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with writing(final / "student.safetensors", run_dir):
            save_tensors(_tensors(student.model), tmp / "student.safetensors")
        with writing(final / "method.safetensors", run_dir):
            save_tensors(_tensors(method), tmp / "method.safetensors")
        if ema is not None:
            with writing(final / EMA_FILE, run_dir):
                save_tensors(_tensors(ema.student.model), tmp / EMA_FILE)
            state = dict(state, ema_updates=ema._updates)
        with writing(final / "state.pt", run_dir):
            torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with writing(ckpt_root / "latest", run_dir):
        write_atomic(ckpt_root / "latest", lambda p: p.write_text(final.name))
    publish(run_dir, final)
    for old in sorted(ckpt_root.glob("epoch-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


EMA_FILE = "ema.safetensors"


def artifacts(checkpoint: Path) -> dict[str, str]:
    """The run's exported files and the checkpoint file each is a copy of: the averaged student's weights are the
    exported student when the run keeps one."""
    student = EMA_FILE if (checkpoint / EMA_FILE).is_file() else "student.safetensors"
    return {"student.safetensors": student, "method.safetensors": "method.safetensors"}


def publish(run_dir: Path, checkpoint: Path) -> None:
    """The run's current artifacts, copied from `checkpoint`."""
    for name, source in artifacts(checkpoint).items():
        with writing(run_dir / name, run_dir):
            write_atomic(run_dir / name, lambda p, s=source: shutil.copyfile(checkpoint / s, p))


def _checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints to resume from, best first: the one `latest` names, then the older ones, newest first
    (all of them, newest first, when `latest` names none)."""
    root = run_dir / "checkpoints"
    kept = sorted((p for p in root.glob("epoch-*") if p.is_dir()), reverse=True)
    try:
        name = (root / "latest").read_text(errors="replace").strip()
    except OSError:
        name = ""
    named = root / name if name.startswith("epoch-") and "/" not in name else None
    if named is None or not named.is_dir():
        return kept
    return [named] + [p for p in kept if p.name < named.name]


def read_checkpoint(path: Path, todo: str) -> dict:
    """The state of the checkpoint folder `path`, after checking that each of its files reads back whole (so
    that a resume never starts on a damaged one); the error names the damaged file."""
    state = read_state(path / "state.pt", todo)
    for name in ("student.safetensors", "method.safetensors") + ((EMA_FILE,) if "ema_updates" in state else ()):
        read_tensors(path / name, todo)
    return state


def load_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """(path, state) of the newest intact checkpoint of a run; None when it has none. A damaged newest one is
    passed over for the one before it (saying so: its epochs are trained again); when none is intact, the
    error names the newest's damaged file and what to do."""
    if not (run_dir / "checkpoints" / "latest").is_file():
        return None
    found = _checkpoints(run_dir)
    problems = []
    for path in found:
        try:
            state = read_checkpoint(path, "")
        except RunFileError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from the previous checkpoint, {path.name}, instead (the epochs "
                  "after it are trained again)", file=sys.stderr)
        return path, state
    root = run_dir / "checkpoints"
    what = problems[0] if problems else f"{root / 'latest'} names no checkpoint folder"
    raise RunFileError(f"{what}, and no earlier checkpoint is intact: remove {root} to start the run again from "
                       "epoch 1, or start a new run with another --out")


def restore(path: Path, student: Student, method: Method, ema=None, state: dict | None = None) -> None:
    todo = f"remove {path} to resume from the checkpoint before it, or start the run again"
    student.model.load_state_dict(read_tensors(path / "student.safetensors", todo))
    method.load_state_dict(read_tensors(path / "method.safetensors", todo))
    if ema is not None:
        ema.student.model.load_state_dict(read_tensors(path / EMA_FILE, todo))
        ema._updates = int((state or {}).get("ema_updates", 0))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records of epochs after the checkpoint a resumed run restarts from (and a last line cut short by a
    kill); a record damaged elsewhere names the file."""
    if not path.is_file():
        return
    todo = "remove that line (its epoch's record is then missing from the run) and run the same command again"
    keep = [line for line, r in metric_lines(path, todo, last_may_be_cut=True) if r.get("epoch", -1) <= last_epoch]
    write_atomic(path, lambda p: p.write_text("".join(x + "\n" for x in keep)))
