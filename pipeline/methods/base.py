"""The method registry and what every method shares."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..students import StudentOutput


class MethodError(ValueError):
    pass


@dataclass
class TeacherBatch:
    features: torch.Tensor  # cached pooled teacher feature f, [B, d_t]
    logits: torch.Tensor | None = None  # z_t, [B, C]
    tokens: torch.Tensor | None = None  # [B, G*G, d_t]


@dataclass(frozen=True)
class Dims:
    student: int  # d_s
    teacher: int  # d_t
    classes: int
    student_map: int = 0  # channels of the student's last feature map
    token_grid: int = 0
    token_dim: int = 0


_METHODS: dict[str, Callable[..., "Method"]] = {}
METHOD_DEFAULTS: dict[str, dict] = {}


def register_method(name: str, **defaults):
    """Register a Method class with its documented default hyper-parameters."""

    def deco(cls):
        _METHODS[name] = cls
        METHOD_DEFAULTS[name] = defaults
        cls.method_name = name
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, dims: Dims, **overrides) -> "Method":
    if name not in _METHODS:
        raise MethodError(f"unknown --method {name!r}; choose one of: {', '.join(list_methods())}")
    params = dict(METHOD_DEFAULTS[name])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise MethodError(f"method {name} has no option(s) {unknown}; it takes: {sorted(params)}")
    params.update(overrides)
    return _METHODS[name](dims, **params)


def labelled_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled rows (label >= 0); 0 when the batch has none."""
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], labels[mask])


def feature_mse(pred: torch.Tensor, target: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """MSE between features; with `normalize`, each vector is first standardised over its channels,
    so the loss is O(1) whatever the teachers' feature scale (raw MSE on small features vanishes)."""
    target = target.float()
    if normalize:
        pred = F.layer_norm(pred, pred.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    return F.mse_loss(pred, target)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


class Method(nn.Module):
    """Base: CE on labelled samples. Subclasses add `extra(...)` parts and trainable extras."""

    method_name = "base"
    needs_features = True
    needs_logits = False
    needs_tokens = False
    uses_unlabelled = True  # False: unlabelled rows carry no loss, so the loader skips them

    def __init__(self, dims: Dims, **params):
        super().__init__()
        self.dims = dims
        self.params = params

    def extra(self, out: StudentOutput, teacher: TeacherBatch, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, out: StudentOutput, teacher: TeacherBatch, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"ce": labelled_ce(out.logits, labels)}
        parts.update(self.extra(out, teacher, labels))
        weights = {k: self.params.get(f"w_{k}", 1.0) for k in parts}
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    # CustomKD overrides these; other methods have no customisation phase
    has_customisation = False

    def config(self) -> dict:
        return {"method": self.method_name, **{k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in self.params.items()}, "dims": dataclasses.asdict(self.dims)}


@register_method("supervised")
class Supervised(Method):
    """The baseline: CE on the labelled samples only."""

    uses_unlabelled = False
    needs_features = False
