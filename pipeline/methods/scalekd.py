"""ScaleKD-style feature mimicking with a cross-attention projector (CAP).

Learnable queries (one per teacher token position) attend over the student's feature map,
projected to the teacher width, to predict the cached GxG teacher tokens. The loss mimics the
tokens directly and with their spatial mean (the DC component) removed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, MethodError, register_method


class CrossAttentionProjector(nn.Module):
    def __init__(self, student_channels: int, teacher_dim: int, num_queries: int, heads: int):
        super().__init__()
        if teacher_dim % heads:
            heads = 1
        self.proj = nn.Conv2d(student_channels, teacher_dim, 1)
        self.queries = nn.Parameter(torch.randn(num_queries, teacher_dim) * 0.02)
        self.attn = nn.MultiheadAttention(teacher_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(teacher_dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        kv = self.proj(feature_map).flatten(2).transpose(1, 2)  # B, HW, D
        q = self.queries.unsqueeze(0).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.norm(out + q)


@register_method("scalekd", heads=4, w_direct=1.0, w_ac=1.0)
class ScaleKD(Method):
    needs_tokens = True

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        if not dims.token_grid:
            raise MethodError("method scalekd needs cached teacher tokens: re-run `python cli.py extract ... "
                              "--tokens 4` (the cache has none)")
        self.cap = CrossAttentionProjector(dims.student_map, dims.token_dim, dims.token_grid ** 2, params["heads"])

    def extra(self, out, teacher, labels):
        pred = self.cap(out.feature_map)
        target = teacher.tokens.float()
        direct = F.mse_loss(pred, target)
        ac = F.mse_loss(pred - pred.mean(1, keepdim=True), target - target.mean(1, keepdim=True))
        return {"direct": direct, "ac": ac}
