"""Row-level targets for CustomKD's customised term, and the first student's predictions of a second generation.

A view's customised target h_s(P_t f) = M f + c is a linear function of that view's cached feature: a student
that matches it on every view converges onto M, a linear head on frozen features. A row-level target instead
gives every clean or augmented view of an unlabelled row the same target: the sharpened, class-balanced mean of
M's predictions over the row's cached views that are not mixed (the pseudo-label the customisation itself is
fitted to), so the student learns, from noisy views and its own dropout or stochastic depth, to predict what the
ensemble predicts from all the row's views (Noisy Student's asymmetry: the target sees clean views averaged, the
student sees one noisy view). Mixed views keep the per-view target: the teacher's response to the blend, which is
function matching.

A second generation (`distill --from-run`) mixes the first student's clean-view prediction of each unlabelled row
into the targets (geometric mean): its errors are a pixel CNN's, not a linear head's on frozen features.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..adapt import pseudo_targets
from .memory import mix_record


class RowTable:
    """A [rows, C] probability table over some cache rows (a spare slot for the others, never a target)."""

    def __init__(self, rows: np.ndarray, num_rows: int, classes: int):
        slots = np.full(num_rows, len(rows), np.int64)
        slots[rows] = np.arange(len(rows))
        self.slots = torch.from_numpy(slots)
        self.probs = torch.zeros(len(rows) + 1, classes)
        self.known = torch.zeros(len(rows) + 1, dtype=torch.bool)

    def set(self, probs: torch.Tensor, known: torch.Tensor | None = None) -> None:
        """The table's rows, in the order given at construction (`known`: which of them hold a value)."""
        probs = probs.detach().float().cpu()  # on the host: `lookup` moves the table where the batch is
        self.probs = torch.cat([probs, torch.zeros(1, probs.shape[1])])
        known = torch.ones(len(probs), dtype=torch.bool) if known is None else known.bool().cpu()
        self.known = torch.cat([known, torch.zeros(1, dtype=torch.bool)])

    def lookup(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [B, C], known [B]) of the batch's rows."""
        if self.probs.device != device:
            self.slots, self.probs, self.known = (t.to(device) for t in (self.slots, self.probs, self.known))
        slot = self.slots[rows.to(device)]
        return self.probs[slot], self.known[slot]


def row_pseudo_labels(mean_logits: torch.Tensor, sharpen: float, balance: bool,
                      previous: torch.Tensor | None = None, weight: float = 0.0) -> torch.Tensor:
    """Each row's target: the customised classifier's mean logits over the row's views (mixed with the first
    student's probabilities `previous` at `weight`, geometric mean), sharpened and class-balanced."""
    logits = mean_logits.float()
    if previous is not None and weight > 0:
        logits = mix_record(logits, previous, torch.full((len(logits), 1), float(weight)))
    return torch.from_numpy(pseudo_targets(logits.numpy(), sharpen, balance))


def soft_kl(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per row: KL(target || softmax(student)) at temperature 1."""
    log_p = F.log_softmax(student_logits.float(), 1)
    t = target_probs.float()
    return (t * (torch.log(t.clamp_min(1e-8)) - log_p)).sum(1)


def kd_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row: T^2 KL(softmax(z_t/T) || softmax(z_s/T)) (`kd_loss` before the batch mean)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, 1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, 1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * t * t


def customised_loss(student_logits: torch.Tensor, view_target: torch.Tensor, temperature: float,
                    row_target: torch.Tensor | None = None, use_row: torch.Tensor | None = None) -> torch.Tensor:
    """The customised term over a batch: each view's KD to its own target at `temperature`, or, where `use_row`
    holds, the soft KL to its row's target (temperature 1: the target is already sharpened)."""
    per_view = kd_per_row(student_logits, view_target, temperature)
    if row_target is None or use_row is None:
        return per_view.mean()
    per_row = soft_kl(student_logits, row_target)
    return torch.where(use_row, per_row, per_view).mean()


class RowTargets:
    """What CustomKD's customised term reads besides each view's own target: the row-level targets of the
    unlabelled rows (`row=True`) and the first student's predictions (a second generation). Plain state,
    recomputed after each customisation (and on resume) from the method's buffers and the first run's student,
    so checkpoints need nothing of it."""

    def __init__(self, row: bool, sharpen: float, balance: bool):
        self.row, self.sharpen, self.balance = row, sharpen, balance
        self.targets: RowTable | None = None
        self.previous: RowTable | None = None
        self.weight = 0.0
        self._rows = np.zeros(0, np.int64)

    def track(self, rows: np.ndarray, num_rows: int, classes: int) -> None:
        """The unlabelled rows (in the customisation's order) that get row-level targets."""
        self._rows, self._num_rows, self._classes = rows, num_rows, classes
        self.targets = RowTable(rows, num_rows, classes) if self.row else None

    @property
    def active(self) -> bool:
        return self.targets is not None or self.previous is not None

    def load_previous(self, predict, weight: float, labels: np.ndarray) -> dict[str, float]:
        """The first student's clean-view probabilities of the tracked rows: `predict(mask)` gives (rows, logits)
        in row order. Returns its top-1 on the tracked rows that have a known label (report only)."""
        mask = np.zeros(self._num_rows, bool)
        mask[self._rows] = True
        rows, logits = predict(mask)
        order = np.searchsorted(rows, self._rows)
        probs = F.softmax(torch.from_numpy(np.asarray(logits)[order]).float(), 1)
        self.previous, self.weight = RowTable(self._rows, self._num_rows, self._classes), float(weight)
        self.previous.set(probs)
        known = labels >= 0
        return {"previous_student_top1": float((probs.argmax(1).numpy()[known] == labels[known]).mean())
                if known.any() else float("nan")}

    def refresh(self, mean_logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
        """The row-level targets from the customised classifier's mean logits over each tracked row's views;
        returns their top-1 on the tracked rows (report only: the labels never reach a target)."""
        if self.targets is None:
            return {}
        prev = self.previous.probs[:-1].cpu() if self.previous is not None else None
        q = row_pseudo_labels(mean_logits, self.sharpen, self.balance, prev, self.weight)
        self.targets.set(q)
        known = labels >= 0
        return {"row_target_top1": float((q.argmax(1).numpy()[known] == labels[known]).mean())
                if known.any() else float("nan")}

    def loss(self, student_logits: torch.Tensor, view_target: torch.Tensor, temperature: float,
             rows: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        """The customised term of a batch: a tracked row's views that are not mixed (`own`; None: every view) read
        the row-level target (or, without one, their own target mixed with the first student's prediction)."""
        device = student_logits.device
        use = torch.ones(len(rows), dtype=torch.bool, device=device) if own is None else own.to(device)
        if self.previous is not None and self.targets is None:
            probs, known = self.previous.lookup(rows, device)
            lam = (self.weight * (known & use).float())[:, None]
            return kd_per_row(student_logits, mix_record(view_target.float(), probs, lam), temperature).mean()
        target, known = self.targets.lookup(rows, device)
        return customised_loss(student_logits, view_target, temperature, target, known & use)
