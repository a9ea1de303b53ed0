"""Students by timm name, with the outputs distillation methods read."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

from .weights import WeightsError, load_state_dict_file


class StudentError(ValueError):
    pass


@dataclass
class StudentOutput:
    feature: torch.Tensor  # pooled pre-logits feature s, [B, d_s]
    pre_act: torch.Tensor  # the same feature before its last activation (KDEP), [B, d_s]
    logits: torch.Tensor  # z_s = h_s(s), [B, C]
    feature_map: torch.Tensor  # last feature map [B, C_map, H, W] (ScaleKD)


class Student(nn.Module):
    """A timm model split into backbone, pooled feature and classifier h_s."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name, self.model = name, model
        cfg = timm.data.resolve_data_config({}, model=model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        self.default_size = int(cfg["input_size"][-1])

    @property
    def head(self) -> nn.Module:
        """h_s: the student's own classifier."""
        return self.model.get_classifier()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def _pool(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        if hasattr(m, "conv_head") and hasattr(m, "act2") and hasattr(m, "norm_head"):
            # MobileNetV3: pool -> conv_head -> norm -> act; keep the pre-activation for KDEP
            x = m.norm_head(m.conv_head(m.global_pool(fmap)))
            pre = m.flatten(x)
            return m.flatten(m.act2(x)), pre
        pooled = m.forward_head(fmap, pre_logits=True)
        return pooled, pooled

    def forward(self, images: torch.Tensor) -> StudentOutput:
        fmap = self.model.forward_features(self.normalize(images))
        feature, pre = self._pool(fmap)
        return StudentOutput(feature, pre, self.head(feature), fmap)

    @torch.no_grad()
    def dims(self, size: int) -> dict[str, int]:
        was = self.training
        self.eval()
        out = self(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=self.mean.device))
        self.train(was)
        return {"feature": out.feature.shape[1], "map": out.feature_map.shape[1]}


def create_student(name: str, num_classes: int, weights: str | None = None, pretrained: bool = False,
                   drop_rate: float = 0.0, drop_path: float = 0.0) -> Student:
    """A timm student with a fresh `num_classes` head; optional backbone weights from a file or the hub; dropout
    before the classifier and stochastic depth when asked (timm's drop_rate and drop_path_rate)."""
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise StudentError(f"unknown --student {name!r} (any timm model name).{hint}")
    noise = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path)) if v}
    try:
        model = timm.create_model(name, pretrained=pretrained and not weights, num_classes=num_classes, **noise)
    except TypeError as e:
        if noise:
            flags = " / ".join(f for f, k in (("--drop-rate", "drop_rate"), ("--drop-path", "drop_path_rate"))
                               if k in noise)
            raise StudentError(f"{flags}: student {name} does not take {', '.join(noise)} ({e}); leave the flag out "
                               "or choose another --student") from None
        raise
    except Exception as e:
        if pretrained:
            raise StudentError(f"could not load pretrained student {name!r} ({e}); pass --student-weights FILE "
                               "or train from scratch") from None
        raise
    if weights:
        try:
            state = load_state_dict_file(weights)
        except WeightsError as e:
            raise StudentError(f"--student-weights {weights}: {e}") from None
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(usable) < len(own) // 2:
            raise StudentError(f"--student-weights {weights}: only {len(usable)} of {len(own)} tensors match "
                               f"{name}; wrong architecture?")
        model.load_state_dict(usable, strict=False)  # the classifier is new (dataset classes)
    return Student(name, model)
