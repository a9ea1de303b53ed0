"""CustomKD: customise the teacher's features for the student's head, then distil.

(A) customisation: train P_t: d_t -> d_s with CE(h_s(P_t(f)), y) on labelled cached features, the
    student and its head frozen (no images needed).
(B) distillation: MSE(P_s(s), f) [task-general] + MSE(s, P_t(f)) [customised, P_t frozen]
    (+ an optional KD term), plus CE on the labelled samples.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, feature_mse, kd_loss, labelled_ce, register_method


@register_method("customkd", w_general=1.0, w_custom=1.0, w_kd=0.0, temperature=4.0, normalize=True,
                 normalize_custom=True)
class CustomKD(Method):
    has_customisation = True

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        self.p_t = nn.Linear(dims.teacher, dims.student)
        self.p_s = nn.Linear(dims.student, dims.teacher)
        self.needs_logits = params.get("w_kd", 0.0) > 0

    def customisation_parameters(self):
        return list(self.p_t.parameters())

    def distillation_parameters(self):
        return list(self.p_s.parameters())

    def customisation_loss(self, student_head: nn.Module, features: torch.Tensor, labels: torch.Tensor):
        """(A): only P_t receives gradients; the head is used as a fixed function."""
        w = [p.detach() for p in student_head.parameters()]
        logits = F.linear(self.p_t(features), *w) if len(w) == 2 else F.linear(self.p_t(features), w[0])
        ce = labelled_ce(logits, labels)
        return {"loss": ce, "custom_ce": ce}

    def extra(self, out, teacher, labels):
        with torch.no_grad():
            custom_target = self.p_t(teacher.features)
        parts = {"general": feature_mse(self.p_s(out.feature), teacher.features, bool(self.params["normalize"])),
                 "custom": feature_mse(out.feature, custom_target, bool(self.params["normalize_custom"]))}
        if self.params["w_kd"] > 0:
            parts["kd"] = kd_loss(out.logits, teacher.logits, self.params["temperature"])
        return parts
