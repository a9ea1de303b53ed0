"""Logit distillation: KD and DKD."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, MethodContext, Opt, kd_loss, register_method, temperature, weight


# Hinton et al. 2015 (T^2-scaled KL to the softened teacher); T 4 as mdistiller's default
# (megvii-research/mdistiller, mdistiller/engine/cfg.py: KD.TEMPERATURE = 4). mdistiller weighs
# CE 0.1 / KD 0.9 on CIFAR and 0.5 / 0.5 with T 1 on ImageNet; here CE and KD both weigh 1, the
# setting every row of the accuracy study shares (benchmarks/study.py), so methods differ only in
# their extra terms.
@register_method("kd", temperature=temperature(4.0), w_kd=weight(1.0), w_ce=weight(1.0))
class KD(Method):
    """Hinton KD on every sample: T^2 KL(softmax(z_t/T) || softmax(z_s/T))."""

    needs_logits = True

    def extra(self, out, teacher, labels):
        return {"kd": kd_loss(out.logits, teacher.logits, self.params["temperature"])}


def dkd_loss(student_logits, teacher_logits, target, alpha: float, beta: float, temperature: float):
    """Decoupled KD: alpha * TCKD (target vs rest) + beta * NCKD (among non-targets), both T^2-scaled."""
    t = temperature
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-8)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-8)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * t * t
    # non-target distributions: mask the target with a large negative before the softmax
    log_q_s = F.log_softmax(student_logits / t - 1000.0 * gt, dim=1)
    q_t = F.softmax(teacher_logits.float() / t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * t * t
    return alpha * tckd, beta * nckd


# Zhao et al., CVPR 2022. Defaults from mdistiller/engine/cfg.py (DKD.ALPHA 1.0, BETA 8.0, T 4.0,
# CE_WEIGHT 1.0, WARMUP 20): its CIFAR-100 setting. Its ImageNet configs use BETA 0.5-2.0 and T 1.
# The official warm-up ramps the DKD term linearly over 20 of 240 epochs; a schedule here is a few
# dozen epochs, so the ramp is an option (warmup_epochs) and off by default.
@register_method("dkd", alpha=weight(1.0), beta=weight(8.0), temperature=temperature(4.0), w_ce=weight(1.0),
                 warmup_epochs=Opt(0.0, float, low=0.0, help="epochs of the linear ramp of the DKD term"))
class DKD(Method):
    """Decoupled KD; on unlabelled samples the teacher's argmax is the target."""

    needs_logits = True
    _ramp = 1.0

    def before_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        w = self.params["warmup_epochs"]
        self._ramp = min((epoch + 1) / w, 1.0) if w > 0 else 1.0
        return {"dkd_ramp": self._ramp} if w > 0 else {}

    def extra(self, out, teacher, labels):
        target = torch.where(labels >= 0, labels, teacher.logits.argmax(1))
        tckd, nckd = dkd_loss(out.logits, teacher.logits, target, self.params["alpha"], self.params["beta"],
                              self.params["temperature"])
        return {"tckd": self._ramp * tckd, "nckd": self._ramp * nckd}
