"""What a student costs and whether its export is faithful: accuracy, params, MACs, latency, ONNX, and the
folder timm loads by itself."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .files import share


def topk_metrics(logits: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray] | None = None) -> dict:
    """Top-1 / top-5 overall and per named group (boolean masks over the rows)."""
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    c1 = top[:, 0] == labels
    c5 = (top == labels[:, None]).any(1)

    def summary(mask):
        n = int(mask.sum())
        return {"top1": float(c1[mask].mean()) if n else float("nan"),
                "top5": float(c5[mask].mean()) if n else float("nan"), "n": n}

    out = summary(np.ones(len(labels), bool))
    out["groups"] = {name: summary(m) for name, m in (groups or {}).items() if m.any()}
    return out


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops() // 2)


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 10,
                   threads: int = 1, batch: int | None = None) -> dict:
    """Wall time of one forward pass on the CPU, measured the standard way: a fixed thread count (restored
    afterwards), inference mode, warm-up passes first, then `repeats` timed passes; median, interquartile
    range and p90 in milliseconds. `batch` repeats the example to that batch size."""
    model = model.eval().cpu()
    x = example.cpu()
    if batch is not None:
        x = x[:1].expand(batch, *x.shape[1:]).contiguous()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(before)
    q = np.percentile(times, [25, 50, 75, 90])
    return {"median_ms": float(q[1]), "iqr_ms": [float(q[0]), float(q[2])], "p90_ms": float(q[3]),
            "repeats": repeats, "warmup": warmup, "threads": threads, "batch": int(x.shape[0])}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Export (batch dimension dynamic) and compare onnxruntime with torch on a batch of 4."""
    import warnings

    import onnxruntime as ort

    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example.cpu(),), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    check = torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = model(check).detach().numpy()
    theirs = session.run(None, {"images": check.numpy()})[0]
    return {"path": str(path), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "bytes": path.stat().st_size, "input": "float32 [B, 3, H, W], normalised with the student's mean/std"}


def export_timm(model: torch.nn.Module, folder: Path, classes: list[str], size: int, mean: list[float],
                std: list[float], interpolation: str, onnx_file: Path | None = None) -> dict:
    """The student as a folder timm loads by itself: model.safetensors + config.json (architecture,
    num_classes, label names, mean/std, input size, interpolation), written by timm's own `save_for_hf`,
    plus the ONNX file when there is one.

        timm.create_model("local-dir:" + folder, pretrained=True)
    """
    import shutil

    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model.eval().cpu(), str(folder), model_config={"label_names": list(classes)},
                safe_serialization=True,
                data_config={"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std),
                             "interpolation": interpolation, "crop_pct": 1.0})
    if onnx_file is not None and onnx_file.is_file():
        shutil.copyfile(onnx_file, folder / "model.onnx")
    share(*(p for p in folder.iterdir() if p.is_file()))  # others load it too (save_for_hf writes 0600)
    return {"folder": str(folder), "load": f'timm.create_model("local-dir:{folder}", pretrained=True)',
            "files": sorted(p.name for p in folder.iterdir())}
