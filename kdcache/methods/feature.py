"""Feature distillation: FitNet and KDEP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.derived import derived_group
from ..codes import Split, Status
from .base import Method, MethodContext, MethodError, Opt, feature_mse, flag, register_method, temperature, weight


# Romero et al., ICLR 2015: a regressor from the student's hint layer to the teacher's guided layer.
# Here the pooled features, standardised per vector (normalize) so the weight means the same for any
# teacher's feature scale.
@register_method("fitnet", w_fitnet=weight(1.0), normalize=flag(True))
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


# He et al., CVPR 2022 (CVMI-Lab/KDEP). PTS with T 0.1 and n 3 are hard-coded in src/resnet.py
# (`torch.pow(torch.abs(feat / 0.1), 1 / 3)`), after mean-centring and the top-k right singular
# vectors of the teacher's features (src/gen_svd_weights.py). The feature-loss weight is 3.0 in the
# scripts for the MicrosoftVision-R50 teacher, MobileNetV2 student included
# (scripts/KDEP_MS-R50_mnv2.sh: --loss_w 3.0; 20.0 for the StandardSP-R50 teacher). KDEP pre-trains
# on the feature loss alone, then fine-tunes with CE: `pretrain_epochs` N > 0 gives that schedule
# (epochs < N: w_kdep * KDEP only; then CE only); 0 trains both terms together.
@register_method("kdep", temperature=temperature(0.1), power=Opt(3.0, float, low=0.0, low_open=True),
                 w_kdep=weight(3.0), pretrain_epochs=Opt(0, int, low=0))
class KDEP(Method):
    """MSE(s_pre_act, PTS(SVD_k(f))): the teacher feature is reduced to the student's width by the top-k
    right singular vectors of the cached features (derived data), then power-temperature scaled."""

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        self.k = min(dims.student, dims.teacher)
        self.register_buffer("mean", torch.zeros(dims.teacher))
        self.register_buffer("components", torch.zeros(self.k, dims.teacher))
        self.fitted = False
        self._phase = "joint"

    def prepare(self, ctx: MethodContext) -> None:
        self.set_svd(*svd_statistics(ctx.store, self.k, write=ctx.write))

    def before_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        n = self.params["pretrain_epochs"]
        self._phase = "joint" if n == 0 else ("pretrain" if epoch < n else "finetune")
        return {"kdep_pretrain": float(self._phase == "pretrain")} if n else {}

    def loss_weight(self, part: str) -> float:
        if self._phase == "pretrain" and part == "ce":
            return 0.0
        if self._phase == "finetune" and part == "kdep":
            return 0.0
        return super().loss_weight(part)

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


def svd_statistics(store, k: int, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-k right singular vectors of the clean train-split features (KDEP), kept with the cache.
    A kept group of other shapes (written before fewer train rows than k were padded) is computed again."""
    d = store.layout.feature_dim
    shapes = {"mean": (d,), "components": (k, d), "singular_values": (k,)}
    group = derived_group(store, f"derived/svd-k{k}", lambda: _svd(store, k), shapes, write)
    return torch.from_numpy(group["mean"][:]), torch.from_numpy(group["components"][:])


def _svd(store, k: int) -> tuple[dict, dict]:
    status, splits = store.status(), store.array("splits")[:]
    f = torch.from_numpy(store.clean_view((status == Status.DONE) & (splits == Split.TRAIN))).double()
    mean = f.mean(0)
    _, s, vh = torch.linalg.svd(f - mean, full_matrices=False)
    comps, s = vh[:k], s[:k]
    # fix each vector's sign so the statistics are reproducible
    comps = comps * torch.sign(comps[torch.arange(len(comps)), comps.abs().argmax(1)])[:, None]
    if len(comps) < k:  # fewer train rows than k: no direction beyond them holds variance; their target is 0
        comps = torch.cat([comps, comps.new_zeros(k - len(comps), f.shape[1])])
        s = torch.cat([s, s.new_zeros(k - len(s))])
    arrays = {"mean": mean.float().numpy(), "components": comps.float().numpy(), "singular_values": s.float().numpy()}
    return arrays, {"rows": len(f)}
