"""A per-row record of the student's predictions, kept during the training steps at no extra forward pass.

Each training step sees one cached view of a row, so an exponential moving average of the student's
softmax per row, over the epochs, averages its predictions over the row's views. A method reads it as
pseudo-labels (CustomKD's customisation) or as the target of another view (self-training). A mixed view
(mixup, cutmix) shows a blend with another row's image: its prediction is not recorded, and the row's record
is not its target (`keep`).

The record is the module's extra state: checkpoints carry it, and DistributedDataParallel never
broadcasts it (each rank records its own rows; `sync` merges them once per epoch).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def mix_record(logits: torch.Tensor, probs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Logits of q^(1 - lam) p^lam (normalised by the softmax that reads them), q = softmax(logits), p = `probs`:
    (1 - lam) log q + lam log p up to a per-row constant, so exactly `logits` where lam is 0."""
    return logits + lam * (torch.log(probs.clamp_min(1e-6)) - F.log_softmax(logits, 1))


class RowMemory(nn.Module):
    def __init__(self, classes: int, momentum: float = 0.5):
        super().__init__()
        self.classes, self.momentum = classes, float(momentum)
        self.track(np.zeros(0, np.int64), 0)

    def track(self, rows: np.ndarray, num_rows: int) -> None:
        """Record the given cache rows (in this order); every other row is ignored. Clears the record."""
        slots = np.full(num_rows, len(rows), np.int64)  # an untracked row writes to a spare slot, never read
        slots[rows] = np.arange(len(rows))
        self.slots = torch.from_numpy(slots)
        self.probs = torch.zeros(len(rows) + 1, self.classes)
        self.seen = torch.zeros(len(rows) + 1)  # 1 once the row has a prediction
        self.fresh = torch.zeros(len(rows) + 1)  # updates since the last sync (merged across ranks)

    def __len__(self) -> int:
        return len(self.probs) - 1

    def _on(self, device) -> None:
        if self.probs.device != device:
            for name in ("slots", "probs", "seen", "fresh"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, rows: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold the batch's softmax into the rows' averages (no host sync: untracked rows go to the spare slot), of
        the views `keep` marks (those that are not mixed; None: every view)."""
        if not len(self):
            return
        self._on(logits.device)
        slot = self.slots[rows.to(logits.device)]
        if keep is not None:  # a mixed view's prediction goes to the spare slot too
            slot = torch.where(keep.to(slot.device), slot, torch.full_like(slot, len(self)))
        p = F.softmax(logits.detach().float(), dim=1)
        old = (self.seen[slot] > 0).float()[:, None] * self.momentum
        self.probs[slot] = old * self.probs[slot] + (1 - old) * p
        self.seen[slot] = 1.0
        self.fresh[slot] += 1.0

    def lookup(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [B, C], seen [B]) of the batch's rows; an untracked or unseen row has seen 0."""
        self._on(device)
        slot = self.slots[rows.to(device)]
        return self.probs[slot], self.seen[slot] * (slot < len(self)).float()

    def bootstrapped(self, target: torch.Tensor, rows: torch.Tensor, weight: float,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
        """Target logits moved towards each row's record (soft bootstrapping): lam = `weight` times the record's
        confidence; untracked and unseen rows, and the views `keep` leaves out (mixed ones), keep `target`."""
        probs, seen = self.lookup(rows, target.device)
        if keep is not None:
            seen = seen * keep.to(seen.device).float()
        return mix_record(target.float(), probs, (weight * seen * probs.max(1).values)[:, None])

    def self_training(self, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                      threshold: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        """FixMatch's unlabelled term with the record of the row's other views (earlier epochs) as the confident
        prediction: CE to its argmax where its confidence reaches `threshold`, averaged over the batch's
        unlabelled rows (label < 0); a view `keep` leaves out (a mixed one) has no target."""
        probs, seen = self.lookup(rows, logits.device)
        conf, target = probs.max(1)
        mask = (seen > 0) & (conf >= threshold) & (labels < 0)
        mask = (mask if keep is None else mask & keep.to(mask.device)).float()
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return (ce * mask).sum() / (labels < 0).sum().clamp_min(1)

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(probs [n, C], seen [n]) of the tracked rows, in the order given to `track`."""
        return self.probs[:-1].cpu().numpy(), self.seen[:-1].cpu().numpy()

    @torch.no_grad()
    def sync(self) -> None:
        """Merge the ranks' records: a row updated during the epoch takes the mean of the ranks that saw it
        (each row is streamed by one rank per epoch, so this is that rank's value)."""
        if dist.is_initialized() and dist.get_world_size() > 1 and len(self):
            fresh = (self.fresh > 0).float()
            total, count = self.probs * fresh[:, None], fresh.clone()
            dist.all_reduce(total)
            dist.all_reduce(count)
            merged = count > 0
            self.probs[merged] = total[merged] / count[merged][:, None]
            self.seen[merged] = 1.0
        self.fresh.zero_()

    def get_extra_state(self) -> torch.Tensor:
        return torch.cat([self.probs[:-1], self.seen[:-1, None]], 1).cpu().contiguous()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.numel() == 0:  # saved while nothing was tracked: an empty record
            return
        if tuple(state.shape) != (len(self), self.classes + 1):
            raise ValueError(f"the saved per-row record holds {tuple(state.shape)} values; this run tracks "
                             f"{len(self)} rows of {self.classes} classes")
        self._on(torch.device("cpu"))
        self.probs[:-1], self.seen[:-1] = state[:, :-1], state[:, -1]
        self.fresh.zero_()
