"""A tiny teacher that knows the synthetic task: trained on images the student never sees.

It stands in for a foundation model: trained with every label of a disjoint image set, so its
features carry knowledge a student with few labels lacks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdcache.datasets import synthetic_image

OFFSET = 100_000  # teacher images: indices the student's dataset never uses


def train_tiny_teacher(path: Path, classes: int = 10, n: int = 1200, size: int = 48, epochs: int = 6,
                       seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=classes)
    cfg = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    idx = np.arange(n) + OFFSET
    labels = torch.tensor(idx % classes)
    images = torch.from_numpy(np.stack([synthetic_image(int(i), int(i % classes), int(i // classes) % 2, size)
                                        for i in idx])).permute(0, 3, 1, 2).float().div(255)
    images = (images - mean) / std
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            b = perm[i:i + 64]
            x = images[b]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(model(x), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
