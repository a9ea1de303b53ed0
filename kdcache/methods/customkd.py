"""CustomKD: customise the teacher's features for the student's head, then distil (DESIGN 6.1).

Each epoch (after `warmup_epochs`):
(A) customisation, on cached features only (no image, seconds): a classifier M on the standardised
    teacher features is refitted from zero by L-BFGS with weight decay on the labelled rows (their
    labels) AND the unlabelled rows (soft pseudo-labels: the teacher's own predictions before the
    first phase, then the previous customised predictions, sharpened and class-balanced). It is
    expressed through the student's own head h_s = (W_h, b_h): P_t f = W_h^+ (M f + c - b_h), so that
    h_s(P_t f) = M f + c. A refit from zero cannot drift or carry memorised state across phases, and
    it sees the unlabelled domain it will be applied to. (M, c) of each phase depends on the cached
    features, the scenario and the options only (not on the student), so the sequence is computed once
    and kept with the cache's derived data; every later student and seed on that scenario reads it.
(B) distillation with P_t frozen: CE on labelled rows + w_custom * T^2 KL(softmax(h_s(P_t f)/T) ||
    softmax(z_s/T)) [customised, task-specific] + w_general * MSE(P_s(s), f) [task-general, features
    standardised] + w_kd * T^2 KL to the teacher's logits, on labelled and unlabelled rows
    + w_self * CE(z_s, argmax r) on unlabelled rows whose record r is confident (>= self_threshold)
    + w_im * (mean entropy - entropy of the mean) of the student's softmax on the batch's unlabelled rows.
Mixed views (mixup, cutmix) never enter (A), nor the record of the student's predictions and the targets made
from it: a row's label and pseudo-label speak of its own image, a mixed view's feature of a blend (adapt.py). (B)
distils them like any view, with the label term mixed by lambda.

Past the customised teacher. (M, c) is a linear classifier on frozen teacher features, and after its first
phase the teacher-only chain barely moves. The student sees the images themselves and passes it: at 40 epochs
on IconShift-dev it ends 3 to 4.5 points above the first customisation on every pair. So by default, from
`move_from` = 75% of the run on, the customisation moves with the student (`student_weight`=1): each refit's
pseudo-labels on the unlabelled rows mix the record r of the student's predictions into the first
customisation's (`anchor`), weighted by r's confidence. r is the student's evaluation-mode prediction on each
unlabelled row's clean view (`record=clean`: one forward pass over those rows after each epoch, from two epochs
before the first refit; or `record=train`, an EMA over the training steps at no extra pass; methods/memory.py,
kept in the checkpoint). The customised teacher then rises to the student (by 3.1 to 4.4 points on the pairs),
and the student keeps its margin (README, "Past the customised teacher"). The phases before `move_from` are the
teacher-only chain's, computed once per cache; `student_weight=0` is that chain throughout (the previous
default). Started with the run (`move_from=0`), the moving teacher pulls the student down to it.
Other options put the student's own predictions into what it learns from, off by default (none beat the
default on those pairs, 3 seeds, one cache):
- `w_self`: FixMatch's term, CE to the confident record of the row's other views;
- `bootstrap`: each unlabelled row's customised target moves towards the row's record (soft bootstrapping);
- `w_im`: information maximisation on the unlabelled rows of each batch (confident predictions, spread over
  the classes).

Beyond the customised teacher's output (methods/targets.py): `target=row` gives every unmixed view of an
unlabelled row its row's sharpened, class-balanced ensemble over the cached views instead of the view's own
M f + c; a second generation (`distill --from-run`) mixes a first student's clean predictions into the targets;
the training session adds student-side noise (`--drop-rate`, `--drop-path`) and an averaged student (`--ema`),
whose predictions are then the record.

Defaults are set by the seeded study (benchmarks/study.py, README "Accuracy study"). The task-general
term is on (w_general=1): on the demo it lifts the short budget from 61.2 ± 3.6 to 67.3 ± 4.9 (3 seeds),
and on the three IconShift-dev pairs it is level with w_general=0 at both budgets.
"""
from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..adapt import predict_views, self_train_head, unmixed_views, view_mean, view_rows
from ..cache.derived import derived_group
from ..progress import bar as progress_bar
from .base import (Method, MethodContext, MethodError, Opt, above_zero, feature_mse, flag, kd_loss, register_method,
                   temperature, unmixed_in, weight)
from .memory import RowMemory, mix_record
from .targets import RowTargets

CHAIN_VERSION = 1  # bump when a phase's fit changes, so kept phases of the old fit are not read
RECORD = "clean"  # the default record of the student's predictions
# what an option reads is there only when: the customisation moves with the student; anything reads the record of
# the student's predictions (`CustomKD._reads_record`)
MOVING = above_zero("student_weight")
RECORDED = above_zero("student_weight", "w_self", "bootstrap")


def chain_key(data: dict, params: dict, kind: str) -> str:
    """What a phase's classifier depends on: the fit's inputs (cached features, labels, teacher logits, and the
    views that are not mixed where some are), its options and the device kind."""
    h = hashlib.sha256()
    for name in ("f_l", "y_l", "f_u", "z_u", "keep_l", "keep_u"):
        if data.get(name) is None:  # no view left out: the key of a cache without mixed views
            continue
        a = np.ascontiguousarray(data[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    keys = ("sharpen", "balance", "custom_wd", "custom_iters", "unlabelled_weight", "first_rounds")
    h.update(repr([(k, params[k]) for k in keys] + [kind, CHAIN_VERSION]).encode())
    return h.hexdigest()[:20]


def information_maximisation(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Over the masked rows: the mean entropy of the softmax minus the entropy of its mean, low when each
    prediction is confident and the predictions spread over the classes (so they cannot collapse onto a few);
    0 without masked rows (no host sync)."""
    log_p = F.log_softmax(logits.float(), 1)
    p = log_p.exp()
    n = mask.sum().clamp_min(1)
    mean = (p * mask[:, None]).sum(0) / n
    return -((p * log_p).sum(1) * mask).sum() / n + (mean * torch.log(mean.clamp_min(1e-8))).sum()


def predict_unlabelled(f_u: np.ndarray, m: torch.Tensor, c: torch.Tensor,
                       keep: np.ndarray | None = None) -> torch.Tensor:
    """The classifier (M, c)'s mean logits over each unlabelled row's cached views (f_u: [n, V, D]) that are not
    mixed (`keep`, [n, V]; None: every view)."""
    rows, counts = view_rows(f_u, keep)
    return torch.from_numpy(predict_views(rows, m.numpy(), c.numpy(), counts))


def report(d: dict, memory: RowMemory, p: dict, m: torch.Tensor, c: torch.Tensor) -> dict[str, float]:
    """How well the customised classifier (M, c) fits the labelled rows and classifies the evaluation rows, and
    the student's recorded predictions on unlabelled rows that are also evaluation rows (labels read for this
    report only)."""

    def top1(f, y):
        return float(((torch.from_numpy(f) @ m.T + c).argmax(1).numpy() == y).mean()) if len(y) else float("nan")

    record = {"custom_fit_top1": top1(d["f_l"][:, 0], d["y_l"])}
    if len(d["y_e"]):
        record["custom_teacher_eval_top1"] = top1(d["f_e"], d["y_e"])
    if len(memory):
        probs, seen = memory.table()
        known = (seen > 0) & (d["y_ue"] >= 0)
        if known.any():
            record["student_record_eval_top1"] = float((probs[known].argmax(1) == d["y_ue"][known]).mean())
        if known.any() and p["bootstrap"] > 0:  # the bootstrapped target, mean over the cached views
            lam = torch.from_numpy(p["bootstrap"] * seen * probs.max(1))[:, None]
            target = mix_record(predict_unlabelled(d["f_u"], m, c, d["keep_u"]), torch.from_numpy(probs), lam).numpy()
            record["custom_target_eval_top1"] = float((target[known].argmax(1) == d["y_ue"][known]).mean())
        if seen.any():
            record["student_record_confident"] = float((probs[seen > 0].max(1) >= p["self_threshold"]).mean())
    return record


@register_method(
    "customkd",
    w_general=weight(1.0, "task-general term MSE(P_s(s), f)"),
    w_custom=weight(1.0, "customised term: KL to h_s(P_t f)"),
    w_kd=weight(0.0, "KL to the teacher's logits"),
    temperature=temperature(4.0, "softmax temperature of the KD term", needs=above_zero("w_kd")),
    custom_temperature=temperature(4.0, "softmax temperature of the customised term", needs=above_zero("w_custom")),
    normalize=flag(True, "standardise each feature vector before the general MSE", needs=above_zero("w_general")),
    warmup_epochs=Opt(0, int, low=0, help="epochs before the first customisation"),
    sharpen=temperature(0.5, "temperature of the pseudo-labels of the unlabelled rows"),
    balance=flag(True, "align the mean pseudo-label with the uniform class prior"),
    first_rounds=Opt(3, int, low=1, help="self-training rounds of the first customisation (then one per epoch)"),
    custom_wd=Opt(1e-3, float, low=0.0, help="weight decay of the customisation fit"),
    custom_iters=Opt(100, int, low=1, help="L-BFGS iterations per customisation"),
    unlabelled_weight=weight(1.0, "weight of the unlabelled rows in the customisation"),
    max_rows=Opt(20000, int, low=1, help="rows (labelled and unlabelled each) the customisation reads"),
    student_weight=Opt(1.0, float, low=0.0, high=1.0,
                       help="weight of the student's recorded predictions in the pseudo-labels of each refit "
                            "from move_from on (0: the teacher-only chain, computed once per cache)"),
    memory_momentum=Opt(0.5, float, low=0.0, high=1.0,
                        help="EMA momentum of the per-row record of the student's softmax over the epochs",
                        needs=RECORDED),
    refit_iters=Opt(20, int, low=1, help="L-BFGS iterations of each moving refit, started from the previous "
                                         "customisation (the objective is convex: the same minimum, sooner)",
                    needs=MOVING),
    w_self=weight(0.0, "self-training term: CE to the recorded prediction of another view of the row"),
    w_im=weight(0.0, "information-maximisation term on unlabelled rows: mean entropy of the student's predictions "
                     "minus the entropy of their batch mean (confident, and spread over the classes)"),
    bootstrap=Opt(0.0, float, low=0.0, high=1.0,
                  help="weight of the student's recorded prediction in each unlabelled row's customised target, "
                       "times the record's confidence (0: the customised teacher's prediction alone)"),
    self_threshold=Opt(0.95, float, low=0.0, high=1.0,
                       help="confidence a recorded prediction needs to be a self-training target"),
    refit_threshold=Opt(0.0, float, low=0.0, high=1.0,
                        help="confidence a recorded prediction needs to enter a moving refit", needs=MOVING),
    record=Opt(RECORD, str, choices=("train", "clean"),
               help="the student's per-row record: the EMA of its softmax at the training steps (train: its "
                    "cached views, train mode, no extra pass) or of its prediction on the clean view after each "
                    "epoch (clean: evaluation mode, one forward pass over the recorded rows)", needs=RECORDED),
    move_from=Opt(0.75, float, low=0.0, high=1.0,
                  help="fraction of the run's customisation phases that read the teacher-only chain before a moving "
                       "customisation (student_weight > 0) starts mixing in the student's record (0: from phase 2)",
                  needs=MOVING),
    target=Opt("view", str, choices=("view", "row"),
               help="what each view of an unlabelled row that is not mixed learns from in the customised term: its own "
                    "customised prediction (view), or the row's: the sharpened, class-balanced mean over the row's "
                    "cached views (row; temperature 1), so that noisy views (and student dropout, --drop-rate) learn "
                    "what the clean ensemble predicts", needs=above_zero("w_custom")),
    anchor=flag(True, "each moving refit mixes the student's record with the first customisation's predictions "
                       "(fixed) instead of the previous customisation's (which compound from phase to phase)",
                 needs=MOVING),
)
class CustomKD(Method):
    needs_logits = True  # w_kd, and the first customisation starts from the teacher's logits

    def __init__(self, dims, **params):
        super().__init__(dims, **params)
        self.p_s = nn.Linear(dims.student, dims.teacher)
        # customisation state: buffers, so checkpoints carry it and P_t never receives gradients
        self.register_buffer("p_t_weight", torch.zeros(dims.student, dims.teacher))
        self.register_buffer("p_t_bias", torch.zeros(dims.student))
        self.register_buffer("head_weight", torch.zeros(dims.classes, dims.student))
        self.register_buffer("head_bias", torch.zeros(dims.classes))
        self.register_buffer("m_weight", torch.zeros(dims.classes, dims.teacher))  # M, c: h_s(P_t f) = M f + c
        self.register_buffer("m_bias", torch.zeros(dims.classes))
        self.register_buffer("phases", torch.zeros((), dtype=torch.long))
        self.memory = RowMemory(dims.classes, self.params["memory_momentum"])  # the student's softmax per row
        # row-level targets and a first student's predictions (plain state, rebuilt each phase: methods/targets.py)
        self.targets = RowTargets(self.params["target"] == "row", self.params["sharpen"], self.params["balance"])
        self._data = None
        self._recorded = None  # mask of the rows whose student predictions are recorded
        self._customised = False  # mirrors phases > 0 without a device sync per step

    # ------------------------------------------------------------------ (A) customisation
    def prepare(self, ctx: MethodContext) -> None:
        sc, store = ctx.scenario, ctx.store
        rng = np.random.default_rng([ctx.seed, 11])

        def subsample(mask):
            rows = np.flatnonzero(mask)
            if len(rows) > self.params["max_rows"]:
                rows = np.sort(rng.choice(rows, self.params["max_rows"], replace=False))
            out = np.zeros_like(mask)
            out[rows] = True
            return out

        lab, unl = subsample(sc.labelled), subsample(sc.unlabelled)
        labels = store.array("labels")[:]
        self._recorded = unl if self._reads_record() else None
        if self._recorded is not None:  # the rows whose student predictions are recorded
            self.memory.track(np.flatnonzero(unl), len(labels))
        self.targets.track(np.flatnonzero(unl), len(labels), self.dims.classes)
        f_l, f_u = store.masked(lab), store.masked(unl)
        if ctx.teacher_logits is None:
            raise MethodError("customkd needs teacher logits (a cache head or a scenario probe)")
        self._keys: dict[str, str] = {}  # chain key per device kind, of these inputs
        # mixed views never enter the fit nor a row's mean prediction (adapt.py says why)
        self._data = {"f_l": f_l, "y_l": labels[lab].astype(np.int64), "f_u": f_u,
                      "z_u": ctx.teacher_logits(unl), "keep_l": unmixed_views(store, lab),
                      "keep_u": unmixed_views(store, unl)}
        # report-only: how well the customised teacher classifies the evaluation rows
        ev = subsample(sc.evaluation)
        self._data.update(f_e=store.clean_view(ev), y_e=labels[ev].astype(np.int64),
                          y_ue=np.where(ev[unl], labels[unl], -1).astype(np.int64),
                          y_u=labels[unl].astype(np.int64))  # the row targets' own top-1 on the unlabelled rows

    def _moving(self) -> bool:
        """Whether the customisation moves with the student (else it is the teacher-only chain)."""
        return self.params["student_weight"] > 0

    def _first_moving(self, epochs: int) -> int:
        """The first phase a moving customisation refits with the student's record (earlier: the fixed chain's)."""
        p = self.params
        if p["move_from"] > 0 and epochs <= 0:
            raise ValueError("customkd move_from > 0 needs the run's length in epochs (a training session gives it)")
        return max(1, math.ceil(p["move_from"] * (epochs - p["warmup_epochs"])))

    def _first_recorded(self, epochs: int) -> int:
        """The first epoch whose clean record is read: two before the first late refit when nothing else reads it."""
        p = self.params
        if p["move_from"] == 0 or p["w_self"] > 0 or p["bootstrap"] > 0:
            return 0
        return p["warmup_epochs"] + self._first_moving(epochs) - 2

    def _reads_record(self) -> bool:
        """Whether anything reads the per-row record of the student's predictions."""
        p = self.params
        return p["student_weight"] > 0 or p["w_self"] > 0 or p["bootstrap"] > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint written before (M, c) were kept in buffers of their own: rebuild them from what
        it holds, h_s(P_t f) = W_h (P_t f) + b_h, so such a run resumes."""
        if prefix + "m_weight" not in state_dict and prefix + "p_t_weight" in state_dict:
            w_h, w_t = state_dict[prefix + "head_weight"].double(), state_dict[prefix + "p_t_weight"].double()
            state_dict[prefix + "m_weight"] = (w_h @ w_t).float()
            state_dict[prefix + "m_bias"] = (w_h @ state_dict[prefix + "p_t_bias"].double()
                                             + state_dict[prefix + "head_bias"].double()).float()
        # a checkpoint written before the per-row record of the student's predictions: an empty record
        state_dict.setdefault(prefix + "memory._extra_state", torch.zeros(0, self.dims.classes + 1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _student_head(self, ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        head = ctx.student.head
        w = head.weight.detach().float().cpu().reshape(self.dims.classes, -1)
        b = head.bias.detach().float().cpu() if getattr(head, "bias", None) is not None else torch.zeros(len(w))
        return w, b

    def _fit_phase(self, phase: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The customised classifier (M, c) of `phase`: self-training from the teacher's logits (phase 0)
        or from the previous phase's classifier, held in the buffers. It depends on the cached features,
        the scenario and the options only, never on the student."""
        d, p = self._data, self.params
        if phase == 0:
            logits_u, rounds = view_mean(d["z_u"], d["keep_u"]), p["first_rounds"]
        else:  # the previous customisation's predictions: one more round of self-training per phase
            logits_u = predict_unlabelled(d["f_u"], self.m_weight.cpu(), self.m_bias.cpu(), d["keep_u"]).numpy()
            rounds = 1
        weight_m, bias_m = self_train_head(d["f_l"], d["y_l"], d["f_u"], logits_u, self.dims.classes, rounds,
                                           p["sharpen"], p["balance"], p["custom_wd"], p["unlabelled_weight"],
                                           p["custom_iters"], device, keep_l=d["keep_l"], keep_u=d["keep_u"])
        return torch.from_numpy(weight_m), torch.from_numpy(bias_m)

    def _chain_key(self, device) -> str:
        """What a phase's classifier depends on: the fit's inputs, its options and the device kind."""
        kind = torch.device(device).type
        if self._keys.get(kind) is None:
            self._keys[kind] = chain_key(self._data, self.params, kind)
        return self._keys[kind]

    def _phase(self, ctx: MethodContext, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) of `phase`, computed once per cache, scenario and options and kept with the cache's
        derived data: every student and seed trained on the same scenario reads the same sequence
        (each phase is a deterministic function of the previous one), so only the first run pays for it."""
        path = f"derived/customkd-{self._chain_key(ctx.device)}/phase-{phase:04d}"

        def fit():
            m, c = self._fit_phase(phase, ctx.device)
            return {"weight": m.numpy(), "bias": c.numpy()}, {"phase": phase}

        group = derived_group(ctx.store, path, fit, write=ctx.write, missing="compute")
        return torch.from_numpy(group["weight"][:]), torch.from_numpy(group["bias"][:])

    def _fit_with_student(self, ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        """A refit whose pseudo-labels on the unlabelled rows mix the previous customised teacher's predictions
        with the student's recorded ones (geometric mean, weight `student_weight` times the record's confidence)
        where that record is confident (>= `refit_threshold`); any other row keeps the teacher's."""
        d, p = self._data, self.params
        if p["anchor"]:  # the first customisation's predictions: read and computed once per run
            if "anchor" not in d:
                d["anchor"] = predict_unlabelled(d["f_u"], *self._phase(ctx, 0), d["keep_u"])
            teacher = d["anchor"]
        else:
            teacher = predict_unlabelled(d["f_u"], self.m_weight.cpu(), self.m_bias.cpu(), d["keep_u"])
        probs, seen = (torch.from_numpy(a) for a in self.memory.table())
        conf = probs.max(1).values
        confident = (conf >= p["refit_threshold"]).float()  # a flat or unseen record leaves the row alone
        lam = p["student_weight"] * (seen * confident * conf)[:, None]  # and a hesitant one weighs little
        mixed = mix_record(teacher, probs, lam)
        start = (self.m_weight.cpu().numpy(), self.m_bias.cpu().numpy())  # same minimum as from zero, reached sooner
        weight_m, bias_m = self_train_head(d["f_l"], d["y_l"], d["f_u"], mixed.numpy(), self.dims.classes, 1,
                                           p["sharpen"], p["balance"], p["custom_wd"], p["unlabelled_weight"],
                                           p["refit_iters"], ctx.device, init=start, keep_l=d["keep_l"],
                                           keep_u=d["keep_u"])
        m, c = dist.broadcast((torch.from_numpy(weight_m), torch.from_numpy(bias_m)))  # one fit for every rank
        return m, c

    def precompute(self, ctx: MethodContext, epochs: int, progress: bool = False) -> None:
        """Fit and keep the customisations of a run of `epochs` epochs (e.g. before many runs start at once);
        with a customisation that moves with the student, only those before its first refit with the student's
        record (they do not depend on the student)."""
        phases = max(0, epochs - self.params["warmup_epochs"])
        phases = min(phases, self._first_moving(epochs)) if self._moving() else phases
        with progress_bar(phases, "phase", "customisation", progress) as bar:
            for phase in range(phases):
                m, c = self._phase(ctx, phase)
                self.m_weight.copy_(m)
                self.m_bias.copy_(c)
                bar.update(1)
        self.m_weight.zero_()  # the run's own state starts where a run without precompute starts
        self.m_bias.zero_()

    def end_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        p = self.params
        if self._recorded is not None and p["record"] == "clean" and epoch >= self._first_recorded(ctx.epochs):
            if ctx.predict_clean is None:
                raise ValueError("customkd record=clean needs the student's predictions on clean views "
                                 "(a training session provides them)")
            rows, logits = ctx.predict_clean(self._recorded)
            self.memory.update(torch.from_numpy(rows), torch.from_numpy(logits))
        self.memory.sync()  # every rank's record complete before the checkpoint and the next phase
        return {}

    @torch.no_grad()
    def before_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        self._customised = int(self.phases) > 0  # also right after a resume restored the buffers
        first = {}
        if ctx.previous_student is not None and self.targets.previous is None:  # a second generation's first student
            first = self.targets.load_previous(ctx.previous_student, ctx.previous_weight, self._data["y_u"])
        if epoch < self.params["warmup_epochs"]:
            return first
        start = time.perf_counter()
        phase = int(self.phases)
        if self._moving() and phase >= self._first_moving(ctx.epochs):
            m, c = self._fit_with_student(ctx)
        else:
            m, c = self._phase(ctx, phase)
        self.m_weight.copy_(m)
        self.m_bias.copy_(c)
        w_h, b_h = self._student_head(ctx)
        pinv = torch.linalg.pinv(w_h.double()).float()  # [d_s, C]
        self.p_t_weight.copy_(pinv @ m)
        self.p_t_bias.copy_(pinv @ (c - b_h))
        self.head_weight.copy_(w_h)
        self.head_bias.copy_(b_h)
        self.phases += 1
        self._customised = True
        if self.targets.targets is not None:
            first.update(self.targets.refresh(predict_unlabelled(self._data["f_u"], m, c, self._data["keep_u"]),
                                              self._data["y_u"]))
        return {"custom_phase": int(self.phases), **report(self._data, self.memory, self.params, m, c), **first,
                "custom_seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------ (B) distillation
    def customised_logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(features.float(), self.p_t_weight, self.p_t_bias), self.head_weight, self.head_bias)

    def extra(self, out, teacher, labels):
        p = self.params
        parts = {}
        if p["w_general"] > 0:
            parts["general"] = feature_mse(self.p_s(out.feature), teacher.features, bool(p["normalize"]))
        own = unmixed_in(teacher)  # a row's record is a target of its views that are not mixed only
        if p["w_custom"] > 0 and self._customised:
            target = self.customised_logits(teacher.features)
            if p["bootstrap"] > 0 and teacher.rows is not None and len(self.memory):
                target = self.memory.bootstrapped(target, teacher.rows, p["bootstrap"], own)
            if self.targets.active and teacher.rows is not None:
                parts["custom"] = self.targets.loss(out.logits, target, p["custom_temperature"], teacher.rows, own)
            else:
                parts["custom"] = kd_loss(out.logits, target, p["custom_temperature"])
        if p["w_kd"] > 0:
            parts["kd"] = kd_loss(out.logits, teacher.logits, p["temperature"])
        if p["w_im"] > 0:
            parts["im"] = information_maximisation(out.logits, (labels < 0).float())
        if teacher.rows is not None and len(self.memory):
            if p["w_self"] > 0:
                parts["self"] = self.memory.self_training(out.logits, teacher.rows, labels, p["self_threshold"], own)
            if self.training and p["record"] == "train":
                self.memory.update(teacher.rows, out.logits, own)  # after the term read the other views' record
        return parts
