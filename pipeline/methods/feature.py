"""Feature distillation: FitNet and KDEP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, MethodError, feature_mse, register_method


@register_method("fitnet", w_fitnet=1.0, normalize=True)
class FitNet(Method):
    """MSE(P_s(s), f) with a linear projector P_s: d_s -> d_t."""

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        self.p_s = nn.Linear(dims.student, dims.teacher)

    def extra(self, out, teacher, labels):
        return {"fitnet": feature_mse(self.p_s(out.feature), teacher.features, bool(self.params["normalize"]))}


def power_temperature_scaling(z: torch.Tensor, temperature: float, power: float) -> torch.Tensor:
    """PTS(z) = sign(z) |z / T|^(1/n)."""
    return torch.sign(z) * (z / temperature).abs().pow(1.0 / power)


@register_method("kdep", temperature=1.0, power=2.0, w_kdep=1.0)
class KDEP(Method):
    """MSE(s_pre_act, PTS(SVD_k(f))): the teacher feature is reduced to the student's width by the top-k
    right singular vectors of the cached features (derived data), then power-temperature scaled."""

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        self.k = min(dims.student, dims.teacher)
        self.register_buffer("mean", torch.zeros(dims.teacher))
        self.register_buffer("components", torch.zeros(self.k, dims.teacher))
        self.fitted = False

    def set_svd(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        if components.shape != self.components.shape:
            raise MethodError(f"KDEP SVD statistics have shape {tuple(components.shape)}, expected "
                              f"{tuple(self.components.shape)}")
        self.mean.copy_(mean)
        self.components.copy_(components)
        self.fitted = True

    def target(self, f: torch.Tensor) -> torch.Tensor:
        reduced = (f - self.mean) @ self.components.T
        return power_temperature_scaling(reduced, self.params["temperature"], self.params["power"])

    def extra(self, out, teacher, labels):
        if not self.fitted:
            raise MethodError("KDEP needs its SVD statistics (set_svd) before training")
        return {"kdep": F.mse_loss(out.pre_act[:, : self.k], self.target(teacher.features))}
