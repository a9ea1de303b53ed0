"""An averaged student: the exponential moving average of the student's weights over the training steps.

The average (`--ema DECAY`) trades the last steps' noise for a smoother model, as mean teachers and timm's
recipes use it. Its decay is warmed up (min(DECAY, (1 + n) / (10 + n)) at update n), so that an early average is
not held near the random initialisation. Floating-point weights and the batch-norm running statistics are averaged;
integer buffers (batch counters) are copied. The averaged copy never trains: it is evaluated, records the student's
clean predictions for a method that reads them, and is the run's exported `student.safetensors`; checkpoints keep
both (`ema.safetensors` beside the trained weights), so a resumed run continues both exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (from 0): `decay`, held lower while few updates have been averaged."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class AveragedStudent(nn.Module):
    def __init__(self, student: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:  # --ema's declared range keeps it inside (an internal check)
            raise ValueError(f"EMA decay {decay} outside (0, 1)")
        self.decay = float(decay)
        self.student = copy.deepcopy(student)
        self.student.requires_grad_(False)
        self._updates = 0  # the updates averaged so far (a checkpoint's state keeps it)

    def train(self, mode: bool = True):
        super().train(False)  # the average never trains: evaluation mode always
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        d = warmed_decay(self.decay, self._updates)
        own, new = self.student.state_dict(), student.state_dict()
        floats = [(own[k], new[k]) for k in own if own[k].is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b.detach().to(a.dtype) for a, b in floats], 1.0 - d)
        for k, v in own.items():
            if not v.is_floating_point():
                v.copy_(new[k])
        self._updates += 1
