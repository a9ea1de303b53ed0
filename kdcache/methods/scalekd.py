"""ScaleKD (Fan et al., NeurIPS 2024; deep-optimization/ScaleKD), on the cached GxG teacher tokens.

A cross-attention projector (CAP) turns the student's last feature map into one vector per teacher
token position: the map goes through a 3x3 conv, BN and ReLU plus a learned position embedding;
learned queries attend over it; a LayerNorm and an FFN (hidden 4x) follow (mmcls/models/dis_losses/
fmdv2.py, AttentionProjector). Two projectors predict the tokens, one per view of the mimicking:
direct (spatial) and with the DC component removed (the official code zeroes the DCT's (0, 0)
coefficient, which for an orthonormal DCT is subtracting the spatial mean). Each prediction and
target is L2-normalised over channels per position; the loss is the summed squared error over the
batch size (fmdv2.py: F.normalize(dim=1), MSELoss(reduction='sum') / N). Weights 0.08 (direct) and
0.06 (DC-removed) from configs/distillers/.../swin-l_distill_res50_img_s3_s4.py (alpha=[0.08, 0.06]);
the logit term is its KD with T 1, weight 0.5, and CE weighs 1 - 0.5 (kd.py; config temp=1.0,
alpha=0.5). The official model applies this at two stages; the cache holds the last stage only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, MethodError, Opt, above_zero, kd_loss, register_method, temperature, weight


class CrossAttentionProjector(nn.Module):
    def __init__(self, student_channels: int, teacher_dim: int, num_queries: int, heads: int, map_size: int = 64):
        super().__init__()
        if teacher_dim % heads:
            heads = 1
        self.proj = nn.Sequential(nn.Conv2d(student_channels, teacher_dim, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(teacher_dim), nn.ReLU(inplace=True))
        self.pos = nn.Parameter(torch.zeros(1, map_size, teacher_dim))
        self.queries = nn.Parameter(torch.randn(num_queries, teacher_dim) * 0.02)
        self.attn = nn.MultiheadAttention(teacher_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(teacher_dim)
        self.ffn = nn.Sequential(nn.Linear(teacher_dim, 4 * teacher_dim), nn.GELU(),
                                 nn.Linear(4 * teacher_dim, teacher_dim))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        kv = self.proj(feature_map).flatten(2).transpose(1, 2)  # B, HW, D
        hw = kv.shape[1]
        pos = self.pos if hw == self.pos.shape[1] else F.interpolate(
            self.pos.transpose(1, 2), size=hw, mode="linear", align_corners=False).transpose(1, 2)
        kv = kv + pos
        q = self.queries.unsqueeze(0).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        out = out + q
        return out + self.ffn(self.norm(out))


def normalised_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over positions and channels of the squared error of channel-L2-normalised tokens, / batch."""
    return ((F.normalize(pred, dim=-1) - F.normalize(target.float(), dim=-1)) ** 2).sum() / len(pred)


@register_method("scalekd", heads=Opt(4, int, low=1), w_direct=weight(0.08), w_ac=weight(0.06),
                 w_kd=weight(0.5), temperature=temperature(1.0, needs=above_zero("w_kd")), w_ce=weight(0.5))
class ScaleKD(Method):
    needs_tokens = True
    needs_logits = True

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        if not dims.token_grid:
            raise MethodError("method scalekd needs cached teacher tokens: re-run `python cli.py extract ... "
                              "--tokens 4` (the cache has none)")
        q = dims.token_grid ** 2
        self.cap = CrossAttentionProjector(dims.student_map, dims.token_dim, q, params["heads"])
        self.cap_ac = CrossAttentionProjector(dims.student_map, dims.token_dim, q, params["heads"])

    def extra(self, out, teacher, labels):
        target = teacher.tokens.float()
        direct = normalised_sse(self.cap(out.feature_map), target)
        pred_ac = self.cap_ac(out.feature_map)
        ac = normalised_sse(pred_ac - pred_ac.mean(1, keepdim=True), target - target.mean(1, keepdim=True))
        parts = {"direct": direct, "ac": ac}
        if self.params["w_kd"] > 0:
            parts["kd"] = kd_loss(out.logits, teacher.logits, self.params["temperature"])
        return parts
