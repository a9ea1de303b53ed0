"""Logit distillation: KD and DKD."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, kd_loss, register_method


@register_method("kd", temperature=4.0, w_kd=1.0)
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


@register_method("dkd", alpha=1.0, beta=8.0, temperature=4.0)
class DKD(Method):
    """Decoupled KD; on unlabelled samples the teacher's argmax is the target."""

    needs_logits = True

    def extra(self, out, teacher, labels):
        target = torch.where(labels >= 0, labels, teacher.logits.argmax(1))
        tckd, nckd = dkd_loss(out.logits, teacher.logits, target, self.params["alpha"], self.params["beta"],
                              self.params["temperature"])
        return {"tckd": tckd, "nckd": nckd}
