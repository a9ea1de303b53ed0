"""The method registry, typed method options, the hooks a method may own, and shared losses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import FALSE_WORDS, TRUE_WORDS, When, unmet_need
from ..registry import Registry
from ..students import StudentOutput


class MethodError(ValueError):
    pass


@dataclass
class TeacherBatch:
    features: torch.Tensor  # cached pooled teacher feature f, [B, d_t]
    logits: torch.Tensor | None = None  # z_t, [B, C]
    tokens: torch.Tensor | None = None  # [B, G*G, d_t]
    rows: torch.Tensor | None = None  # the cache rows of the batch, [B] (a method may keep per-row state)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # any other cached teacher output, by array name


@dataclass(frozen=True)
class Dims:
    student: int  # d_s
    teacher: int  # d_t
    classes: int
    student_map: int = 0  # channels of the student's last feature map
    token_grid: int = 0
    token_dim: int = 0


# ----------------------------------------------------------------------------- typed options


@dataclass(frozen=True)
class Opt:
    """One method option: its default, type and range. `low_open` excludes the lower bound; `needs`: the
    conditions on the method's other options (`When`, or a tuple of them: any one) under which it has an
    effect, so that giving it where it has none is refused (`parse_method_options`)."""

    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple = ()
    help: str = ""
    needs: tuple = ()

    def parse(self, method: str, key: str, value: Any) -> Any:
        where = f"--method-opt {key}={value!r} (method {method})"
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return value.strip().lower() in TRUE_WORDS
            raise MethodError(f"{where}: expected a boolean (true/false, yes/no, 1/0)")
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise MethodError(f"{where}: choose one of {', '.join(self.choices)}")
            return value
        try:
            if isinstance(value, bool):
                raise ValueError
            parsed = self.kind(value) if self.kind is float else int(str(value))
        except (TypeError, ValueError):
            raise MethodError(f"{where}: expected {'a number' if self.kind is float else 'an integer'}") from None
        if not np.isfinite(parsed):
            raise MethodError(f"{where}: must be finite")
        if self.low is not None and (parsed < self.low or (self.low_open and parsed == self.low)):
            raise MethodError(f"{where}: must be {'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None and parsed > self.high:
            raise MethodError(f"{where}: must be <= {self.high:g}")
        return parsed


def weight(default: float, help: str = "") -> Opt:
    return Opt(float(default), float, low=0.0, help=help)


def temperature(default: float, help: str = "softmax temperature", needs: tuple = ()) -> Opt:
    return Opt(float(default), float, low=0.0, low_open=True, help=help, needs=needs)


def flag(default: bool, help: str = "", needs: tuple = ()) -> Opt:
    return Opt(bool(default), bool, help=help, needs=needs)


def above_zero(*keys: str) -> tuple:
    """`Opt.needs` of an option read only while one of the options `keys` is above 0."""
    return (tuple(When(k, above=0) for k in keys),)


# ----------------------------------------------------------------------------- registry

METHODS = Registry("--method", MethodError)
METHOD_OPTIONS: dict[str, dict[str, Opt]] = {}
METHOD_DEFAULTS: dict[str, dict] = {}


def register_method(name: str, **options: Opt | Any):
    """Register a Method class with its typed options (an `Opt`, or a plain default typed by its value)."""

    def typed(v):
        if isinstance(v, Opt):
            return v
        return Opt(v, bool if isinstance(v, bool) else str if isinstance(v, str) else float)

    def deco(cls):
        METHODS.add(name, cls)
        METHOD_OPTIONS[name] = {k: typed(v) for k, v in options.items()}
        METHOD_DEFAULTS[name] = {k: o.default for k, o in METHOD_OPTIONS[name].items()}
        cls.method_name = name
        return cls

    return deco


def list_methods() -> list[str]:
    return METHODS.names()


def labelled_only_methods() -> list[str]:
    """The methods whose loss skips unlabelled rows (the loader leaves them out)."""
    return [n for n in METHODS.names() if not METHODS.get(n).uses_unlabelled]


def methods_without_logits() -> list[str]:
    """The methods that never read the teacher's logits (nor a head of the teacher)."""
    return [n for n in METHODS.names() if not METHODS.get(n).needs_logits]


def parse_method_options(name: str, overrides: dict) -> dict:
    """Defaults updated by `overrides`, each parsed and range-checked; unknown keys are refused."""
    METHODS.get(name)
    spec = METHOD_OPTIONS[name]
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise MethodError(f"method {name} has no option(s) {unknown}; it takes: {sorted(spec)}")
    params = dict(METHOD_DEFAULTS[name])
    params.update({k: spec[k].parse(name, k, v) for k, v in overrides.items()})
    problem = unmet_need({k: o.needs for k, o in spec.items() if o.needs}, params, overrides, str,
                         lambda k: f"--method-opt {k}={overrides[k]} (method {name})")
    if problem:
        raise MethodError(problem)
    return params


def create_method(name: str, dims: Dims, **overrides) -> "Method":
    params = parse_method_options(name, overrides)
    return METHODS.get(name)(dims, **params)


# ----------------------------------------------------------------------------- shared losses


def labelled_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled rows (label >= 0); 0 when the batch has none."""
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], labels[mask])


MIX_KEYS = ("mix_label", "mix_lam")  # what a batch of a cache with mixed views carries for the label term


def mixed_ce(logits: torch.Tensor, labels: torch.Tensor, mix_label: torch.Tensor | None = None,
             mix_lam: torch.Tensor | None = None) -> torch.Tensor:
    """The label term of a batch that may hold mixed views: over the labelled rows (label >= 0), a mixed view's
    CE is lam * CE(own label) + (1 - lam) * CE(partner's label); a partner without a label (unlabelled in the
    scenario) contributes none, so that row's label term is lam * CE(own label). Rows without a label carry no
    label term, mixed or not. A batch without mixed views is `labelled_ce`, computed exactly as it is."""
    if mix_lam is None or mix_label is None or not bool((mix_lam < 1).any()):
        return labelled_ce(logits, labels)
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    z, lam, other = logits[mask], mix_lam[mask].float(), mix_label[mask]
    own = F.cross_entropy(z, labels[mask], reduction="none")
    partner = F.cross_entropy(z, other.clamp_min(0), reduction="none") * (other >= 0)
    return (lam * own + (1 - lam) * partner).mean()


def unmixed_in(teacher: TeacherBatch) -> torch.Tensor | None:
    """[B] True for the batch's views that are not mixed (a mixed view's own image weighs lam < 1); None for a
    batch without the mix record (a cache without mixed views). A row's own label or prediction is a target of
    the views that show its image alone."""
    lam = teacher.extra.get("mix_lam")
    return None if lam is None else lam >= 1


def feature_mse(pred: torch.Tensor, target: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """MSE between features; with `normalize`, each vector is first standardised over its channels,
    so the loss is O(1) whatever the teachers' feature scale (raw MSE on small features vanishes)."""
    target = target.float()
    if normalize:
        pred = F.layer_norm(pred, pred.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    return F.mse_loss(pred, target)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


# ----------------------------------------------------------------------------- hooks


@dataclass
class MethodContext:
    """What a method may read when it prepares from the cache and before each epoch.

    `teacher_logits(mask, view=None)` gives the scenario's teacher logits of the masked rows, every view
    [n, V, C] or one [n, C] (the cached logits, or the head refitted on the scenario's labels applied
    to the cached features). `write` is True on the rank that may store
    derived data in the cache; the others read what it stored.
    """

    store: Any  # CacheStore
    scenario: Any  # Scenario
    student: nn.Module  # Student
    device: torch.device
    seed: int = 0
    write: bool = True
    teacher_logits: Callable[..., np.ndarray] | None = None
    # `predict_clean(mask)`: (rows, logits [n, C]), the student's predictions on the clean view of the masked rows,
    # in row order (evaluation mode, one forward pass each; set by the training session, None outside a run)
    predict_clean: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    epochs: int = 0  # the run's length in epochs (0: not known, outside a run)
    # a second generation (`distill --from-run`): `previous_student(mask)` gives (rows, logits), the first run's
    # student's predictions on the clean view of the masked rows, in row order; mixed into targets at `previous_weight`
    previous_student: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    previous_weight: float = 0.0


class Method(nn.Module):
    """Base: CE on labelled samples. Subclasses add `extra(...)` parts and trainable extras.

    A method that needs statistics of the cache overrides `prepare(ctx)` (called once before
    training, and again on resume); one with a phase of its own between epochs overrides
    `before_epoch(ctx, epoch)` (and `end_epoch(ctx, epoch)` after the training pass), which return numbers
    for the epoch's metrics record. State such a
    phase computes lives in buffers, so checkpoints carry it and a resumed run continues exactly.
    """

    method_name = "base"
    needs_features = True
    needs_logits = False
    needs_tokens = False
    uses_unlabelled = True  # False: unlabelled rows carry no loss, so the loader skips them

    def __init__(self, dims: Dims, **params):
        super().__init__()
        self.dims = dims
        self.params = params

    def prepare(self, ctx: MethodContext) -> None:
        pass

    def before_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        return {}

    def end_epoch(self, ctx: MethodContext, epoch: int) -> dict[str, float]:
        """After the epoch's training pass, on every rank, before evaluation and the checkpoint."""
        return {}

    def precompute(self, ctx: MethodContext, epochs: int, progress: bool = False) -> None:
        """Compute ahead (and keep with the cache) what `before_epoch` would compute in a run of `epochs`
        epochs, where that does not depend on training; after `prepare`."""

    def extra(self, out: StudentOutput, teacher: TeacherBatch, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def loss_weight(self, part: str) -> float:
        return float(self.params.get(f"w_{part}", 1.0))

    def forward(self, out: StudentOutput, teacher: TeacherBatch, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"ce": mixed_ce(out.logits, labels, *(teacher.extra.get(k) for k in MIX_KEYS))}
        parts.update(self.extra(out, teacher, labels))
        parts["loss"] = sum(self.loss_weight(k) * v for k, v in parts.items())
        return parts

    def config(self) -> dict:
        return {"method": self.method_name, **{k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in self.params.items()}, "dims": dataclasses.asdict(self.dims)}


@register_method("supervised")
class Supervised(Method):
    """The baseline: CE on the labelled samples only."""

    uses_unlabelled = False
    needs_features = False
