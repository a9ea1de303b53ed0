"""Each method's loss on tiny tensors has its documented value, and gradients reach exactly the
parameters they should."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import numpy as np
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.methods import MethodContext, MethodError, TeacherBatch, create_method, list_methods
from kdcache.methods.base import Dims
from kdcache.methods.feature import power_temperature_scaling
from kdcache.methods.memory import RowMemory
from kdcache.students import StudentOutput, create_student

B, DS, DT, C = 4, 6, 5, 3
DIMS = Dims(DS, DT, C, student_map=7, token_grid=2, token_dim=DT)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = StudentOutput(torch.randn(B, DS, generator=g).requires_grad_(), torch.randn(B, DS, generator=g).requires_grad_(),
                        torch.randn(B, C, generator=g).requires_grad_(),
                        torch.randn(B, 7, 3, 3, generator=g).requires_grad_())
    teacher = TeacherBatch(torch.randn(B, DT, generator=g), torch.randn(B, C, generator=g),
                           torch.randn(B, 4, DT, generator=g))
    labels = torch.tensor([2, -1, 0, -1])  # two labelled, two unlabelled
    return out, teacher, labels


def _ce(out, labels):
    return F.cross_entropy(out.logits[[0, 2]], labels[[0, 2]])


def test_registry():
    assert list_methods() == ["customkd", "dkd", "fitnet", "kd", "kdep", "scalekd", "supervised"]
    with pytest.raises(MethodError, match="choose one of"):
        create_method("fitnets", DIMS)
    with pytest.raises(MethodError, match="no option"):
        create_method("kd", DIMS, temprature=2)


def test_supervised_is_ce_on_labelled_only():
    out, t, y = _batch()
    parts = create_method("supervised", DIMS)(out, t, y)
    assert torch.allclose(parts["loss"], _ce(out, y))
    parts["loss"].backward()
    assert out.logits.grad[[1, 3]].abs().sum() == 0 and out.logits.grad[[0, 2]].abs().sum() > 0
    assert out.feature.grad is None


def test_kd_value():
    out, t, y = _batch()
    m = create_method("kd", DIMS, temperature=2.0)
    parts = m(out, t, y)
    p_t = F.softmax(t.logits / 2, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(out.logits / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(parts["kd"], manual, atol=1e-6)
    assert torch.allclose(parts["loss"], _ce(out, y) + manual, atol=1e-6)
    parts["loss"].backward()
    assert out.logits.grad[[1, 3]].abs().sum() > 0  # KD reaches unlabelled samples too
    assert list(m.parameters()) == []


def test_fitnet_value_and_grads():
    out, t, y = _batch()
    m = create_method("fitnet", DIMS)
    parts = m(out, t, y)
    ln = lambda x: F.layer_norm(x, x.shape[-1:])  # noqa: E731
    assert torch.allclose(parts["fitnet"], ((ln(m.p_s(out.feature)) - ln(t.features)) ** 2).mean(), atol=1e-6)
    parts["fitnet"].backward()
    assert m.p_s.weight.grad.abs().sum() > 0 and out.feature.grad.abs().sum() > 0 and out.logits.grad is None
    raw = create_method("fitnet", DIMS, normalize=False)
    assert torch.allclose(raw(out, t, y)["fitnet"], F.mse_loss(raw.p_s(out.feature), t.features))


def _dkd_reference(zs, zt, target, alpha, beta, temp):
    """Straight from the DKD paper's definitions, one sample at a time."""
    total_t, total_n = 0.0, 0.0
    for i in range(len(zs)):
        ps, pt = F.softmax(zs[i] / temp, 0), F.softmax(zt[i] / temp, 0)
        g = int(target[i])
        bs = torch.stack([ps[g], 1 - ps[g]])
        bt = torch.stack([pt[g], 1 - pt[g]])
        total_t += (bt * (bt / bs).log()).sum()
        keep = [j for j in range(len(ps)) if j != g]
        qs, qt = F.softmax(zs[i][keep] / temp, 0), F.softmax(zt[i][keep] / temp, 0)
        total_n += (qt * (qt / qs).log()).sum()
    n = len(zs)
    return alpha * total_t / n * temp ** 2, beta * total_n / n * temp ** 2


def test_dkd_matches_the_definition_with_teacher_argmax_on_unlabelled():
    out, t, y = _batch()
    parts = create_method("dkd", DIMS, alpha=1.0, beta=8.0, temperature=4.0)(out, t, y)
    target = torch.where(y >= 0, y, t.logits.argmax(1))
    ref_t, ref_n = _dkd_reference(out.logits.detach(), t.logits, target, 1.0, 8.0, 4.0)
    assert torch.allclose(parts["tckd"], ref_t, atol=1e-5) and torch.allclose(parts["nckd"], ref_n, atol=1e-5)


def test_kdep_value():
    assert torch.allclose(power_temperature_scaling(torch.tensor([-8.0, 2.0, 0.0]), 2.0, 2.0),
                          torch.tensor([-2.0, 1.0, 0.0]))
    out, t, y = _batch()
    m = create_method("kdep", DIMS, temperature=1.0, power=2.0, w_kdep=1.0)
    with pytest.raises(MethodError, match="SVD"):
        m(out, t, y)
    mean, comps = torch.randn(DT), torch.linalg.qr(torch.randn(DT, DT))[0][: m.k]
    m.set_svd(mean, comps)
    z = (t.features - mean) @ comps.T
    target = torch.sign(z) * z.abs().sqrt()
    parts = m(out, t, y)
    assert m.k == min(DS, DT) == 5
    assert torch.allclose(parts["loss"], _ce(out, y) + parts["kdep"], atol=1e-6)
    assert torch.allclose(parts["kdep"], F.mse_loss(out.pre_act[:, :5], target), atol=1e-6)
    parts["kdep"].backward()
    assert out.pre_act.grad.abs().sum() > 0 and out.feature.grad is None


def test_scalekd_needs_tokens_and_mimics_both_views_l2_normalised():
    with pytest.raises(MethodError, match="extract .*--tokens"):
        create_method("scalekd", Dims(DS, DT, C, 7, 0, 0))
    out, t, y = _batch()
    m = create_method("scalekd", DIMS, heads=1)
    parts = m(out, t, y)
    pred, pred_ac = m.cap(out.feature_map), m.cap_ac(out.feature_map)
    assert pred.shape == (B, 4, DT)
    dc = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    assert torch.allclose(parts["direct"], ((unit(pred) - unit(t.tokens)) ** 2).sum() / B, atol=1e-5)
    assert torch.allclose(parts["ac"], ((unit(dc(pred_ac)) - unit(dc(t.tokens))) ** 2).sum() / B, atol=1e-5)
    kd = F.kl_div(F.log_softmax(out.logits, 1), F.softmax(t.logits, 1), reduction="batchmean")
    assert torch.allclose(parts["kd"], kd, atol=1e-6)  # T 1
    # the official weights: 0.08 direct, 0.06 DC-removed, 0.5 KD, 0.5 CE
    expected = 0.5 * _ce(out, y) + 0.08 * parts["direct"] + 0.06 * parts["ac"] + 0.5 * parts["kd"]
    assert torch.allclose(parts["loss"], expected, atol=1e-6)
    (parts["direct"] + parts["ac"]).backward()
    assert out.feature_map.grad.abs().sum() > 0 and all(p.grad is not None for p in m.cap.parameters())


def test_customkd_defaults_are_the_studied_ones():
    p = create_method("customkd", DIMS).params
    assert (p["w_custom"], p["w_general"], p["w_kd"], p["warmup_epochs"], p["first_rounds"]) == (1.0, 1.0, 0.0, 0, 3)


def test_official_defaults():
    kdep = create_method("kdep", DIMS).params
    assert (kdep["temperature"], kdep["power"], kdep["w_kdep"]) == (0.1, 3.0, 3.0)
    dkd = create_method("dkd", DIMS).params
    assert (dkd["alpha"], dkd["beta"], dkd["temperature"]) == (1.0, 8.0, 4.0)
    assert create_method("kd", DIMS).params["temperature"] == 4.0


def test_kdep_pretrain_then_finetune_schedule():
    out, t, y = _batch()
    m = create_method("kdep", DIMS, pretrain_epochs=2)
    m.set_svd(torch.zeros(DT), torch.eye(DT)[: m.k])
    m.before_epoch(None, 0)
    p = m(out, t, y)
    assert torch.allclose(p["loss"], 3.0 * p["kdep"])  # feature loss alone
    m.before_epoch(None, 2)
    p = m(out, t, y)
    assert torch.allclose(p["loss"], p["ce"])  # then CE alone


@pytest.mark.parametrize("method,key,value,match", [
    ("kd", "temperature", 0, "must be > 0"),
    ("kd", "temperature", "hot", "expected a number"),
    ("customkd", "w_kd", -1, "must be >= 0"),
    ("customkd", "normalize", "maybe", "expected a boolean"),
    ("customkd", "warmup_epochs", 1.5, "expected an integer"),
    ("dkd", "beta", float("nan"), "finite"),
    ("customkd", "w_kdd", 1, "no option"),
])
def test_bad_method_options_are_refused_by_name(method, key, value, match):
    with pytest.raises(MethodError, match=match) as err:
        create_method(method, DIMS, **{key: value})
    assert key in str(err.value)


def test_method_options_parse_strings_and_booleans():
    for text, expect in (("true", True), ("yes", True), ("1", True), ("false", False), ("no", False), ("0", False)):
        assert create_method("customkd", DIMS, normalize=text).params["normalize"] is expect
    assert create_method("kd", DIMS, temperature="2.5").params["temperature"] == 2.5
    assert create_method("customkd", DIMS, warmup_epochs="3").params["warmup_epochs"] == 3


# ----------------------------------------------------------------------------- CustomKD


class _Store:
    """The few CacheStore reads CustomKD makes, over arrays in memory, and the derived-data interface
    (cache.derived) over a Zarr group in memory."""

    def __init__(self, features, labels, mix=None):
        self.arrays = {"features": features, "labels": labels, **({"mix": mix} if mix is not None else {})}
        self.features, self.labels = features, labels
        self.group = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w", zarr_format=3)

    def has(self, name):
        return name in self.arrays

    def derived_read_groups(self):
        return [self.group]

    def derived_write_group(self):
        return self.group

    def derived_lock(self, path):
        return contextlib.nullcontext()

    def masked(self, mask, name="features", view=None):
        x = self.arrays[name][mask]
        return x if view is None else x[:, view]

    def clean_view(self, mask):
        return self.masked(mask, view=0)

    def array(self, name):
        return self.arrays[name]


class _Scenario:
    def __init__(self, labelled, unlabelled, evaluation):
        self.labelled, self.unlabelled, self.evaluation = labelled, unlabelled, evaluation


def _customkd_ctx(seed=0, n=120, views=2, shift=0.0, unlabelled_logits=None):
    """Two Gaussian classes per prototype; 10 labelled rows, the rest unlabelled (shifted domain)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    protos = rng.normal(size=(C, DT)) * 2
    feats = protos[labels][:, None, :] + rng.normal(size=(n, views, DT))
    labelled = np.zeros(n, bool)
    labelled[:10] = True
    feats[~labelled] += shift
    unlabelled = ~labelled
    evaluation = unlabelled.copy()
    student = create_student("test_efficientnet", C)
    dims = Dims(student.dims(32)["feature"], DT, C)
    logits = unlabelled_logits if unlabelled_logits is not None else \
        (lambda mask, view=None: feats[mask] @ protos.T if view is None else feats[mask][:, view] @ protos.T)
    ctx = MethodContext(_Store(feats.astype(np.float32), labels), _Scenario(labelled, unlabelled, evaluation),
                        student, torch.device("cpu"), seed, True, logits, epochs=10)
    return ctx, dims, feats, labels


def test_customkd_customisation_is_deterministic_and_expressed_through_the_student_head():
    torch.manual_seed(0)
    ctx, dims, feats, labels = _customkd_ctx()
    fitted = []
    for _ in range(2):
        ctx.store = _Store(feats.astype(np.float32), labels)  # each with an empty store: both fit the customisation
        m = create_method("customkd", dims, warmup_epochs=0)
        m.prepare(ctx)
        record = m.before_epoch(ctx, 0)
        fitted.append(m.p_t_weight.clone())
        assert len(list(ctx.store.group["derived"].group_keys())) == 1  # the phase is kept with the store
    assert torch.equal(fitted[0], fitted[1])  # same seed and inputs: bit-identical P_t
    assert record["custom_phase"] == 1 and record["custom_fit_top1"] == 1.0
    # h_s(P_t f) through the student's own head is the fitted classifier
    f = torch.from_numpy(feats[:, 0].astype(np.float32))
    w_h, b_h = ctx.student.head.weight.detach(), ctx.student.head.bias.detach()
    through_head = (f @ m.p_t_weight.T + m.p_t_bias) @ w_h.T + b_h
    assert torch.allclose(m.customised_logits(f), through_head, atol=1e-4)
    assert (through_head.argmax(1).numpy() == labels).mean() > 0.9


def test_customkd_runs_its_later_phases_without_unlabelled_rows():
    """The supervised scenario has no unlabelled row: each phase refits on the labelled rows alone."""
    from kdcache.adapt import predict_views

    none = np.zeros((0, DT), np.float32)
    assert predict_views(none, np.zeros((C, DT), np.float32), np.zeros(C, np.float32), 2).shape == (0, C)
    ctx, dims, feats, labels = _customkd_ctx()
    every = np.ones(len(labels), bool)
    ctx.scenario = _Scenario(every, ~every, every)
    m = create_method("customkd", dims, warmup_epochs=0)
    m.prepare(ctx)
    records = [m.before_epoch(ctx, epoch) for epoch in range(3)]
    assert [r["custom_phase"] for r in records] == [1, 2, 3]
    f = torch.from_numpy(feats[:, 0].astype(np.float32))
    assert (m.customised_logits(f).argmax(1).numpy() == labels).mean() > 0.9


def test_customkd_customisation_uses_unlabelled_rows():
    """Only the unlabelled rows' teacher predictions differ between the two fits, and P_t follows them."""
    ctx, dims, feats, labels = _customkd_ctx()
    n = len(labels)
    flipped = lambda mask, view=None: np.roll(np.eye(C)[labels], 1, axis=1)[mask][:, None].repeat(  # noqa: E731
        feats.shape[1], 1) * 10
    ctx2, *_ = _customkd_ctx(unlabelled_logits=flipped)
    ctx2.student = ctx.student
    out = []
    for c in (ctx, ctx2):
        m = create_method("customkd", dims, warmup_epochs=0, sharpen=1.0, balance=False, first_rounds=1)
        m.prepare(c)
        rec = m.before_epoch(c, 0)
        out.append((m, rec))
    assert not torch.equal(out[0][0].p_t_weight, out[1][0].p_t_weight)
    f = torch.from_numpy(feats[10:, 0].astype(np.float32))
    agree = lambda m, y: (m.customised_logits(f).argmax(1).numpy() == y[10:]).mean()  # noqa: E731
    assert agree(out[0][0], labels) > 0.9  # teacher right on the unlabelled rows
    assert agree(out[1][0], np.roll(np.arange(C), -1)[labels]) > 0.5  # teacher's (wrong) predictions followed
    assert n > 10


def test_customkd_self_training_beats_the_labelled_only_fit_under_shift():
    """A shifted unlabelled domain: the customised classifier after a few phases is more accurate there
    than the teacher's probe from 10 labelled rows, without ever reading the unlabelled labels."""
    ctx, dims, feats, labels = _customkd_ctx(n=300, shift=1.5)
    from kdcache.heads import fit_probe
    w, b = fit_probe(feats[:10].reshape(-1, DT), np.repeat(labels[:10], feats.shape[1]), C)
    probe = lambda mask, view=None: feats[mask] @ w.T + b if view is None else feats[mask][:, view] @ w.T + b  # noqa: E731
    ctx.teacher_logits = probe
    before = ((feats[10:, 0] @ w.T + b).argmax(1) == labels[10:]).mean()
    m = create_method("customkd", dims, warmup_epochs=0)
    m.prepare(ctx)
    for epoch in range(3):
        rec = m.before_epoch(ctx, epoch)
    assert rec["custom_teacher_eval_top1"] >= before


def test_customkd_phase_b_gradients_and_warmup():
    torch.manual_seed(0)
    ctx, dims, feats, labels = _customkd_ctx()
    m = create_method("customkd", dims, warmup_epochs=1, w_general=1, w_kd=1)
    m.prepare(ctx)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    t = TeacherBatch(torch.from_numpy(feats[:B, 0].astype(np.float32)), torch.randn(B, C))
    y = torch.tensor([0, 1, -1, 2])
    assert m.before_epoch(ctx, 0) == {}  # warm-up: no customisation yet
    parts = m(ctx.student(images), t, y)
    assert set(parts) == {"ce", "general", "kd", "loss"}
    m.before_epoch(ctx, 1)
    parts = m(ctx.student(images), t, y)
    assert set(parts) == {"ce", "general", "custom", "kd", "loss"}
    parts["loss"].backward()
    assert m.p_s.weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in m.buffers())  # P_t is fitted in phase A, frozen in phase B
    assert ctx.student.head.weight.grad.abs().sum() > 0
    assert torch.allclose(parts["loss"], parts["ce"] + parts["general"] + parts["custom"] + parts["kd"])


def test_no_method_is_named_in_the_distill_driver():
    """Methods own their phases: the stages never branch on a method's name."""
    from pathlib import Path

    from kdcache.scenarios import SCENARIOS
    root = Path(__file__).resolve().parents[1] / "kdcache" / "stages"
    for name in ("distill.py", "extract.py", "evaluate.py", "config.py"):
        text = (root / name).read_text()
        assert "method ==" not in text and "method_name ==" not in text
        for method in set(list_methods()) - set(SCENARIOS):  # "supervised" is also a scenario
            assert f'"{method}"' not in text and f"'{method}'" not in text, (name, method)


def test_customkd_checkpoint_from_before_the_classifier_buffers_still_loads():
    """A method state saved without m_weight / m_bias (older runs) loads, with (M, c) rebuilt from the head
    and P_t it holds."""
    ctx, dims, feats, labels = _customkd_ctx()
    m = create_method("customkd", dims, warmup_epochs=0, w_self=0.0, student_weight=0.0)
    m.prepare(ctx)
    m.before_epoch(ctx, 0)
    old = {k: v for k, v in m.state_dict().items() if k not in ("m_weight", "m_bias")}
    fresh = create_method("customkd", dims, warmup_epochs=0, w_self=0.0, student_weight=0.0)
    fresh.load_state_dict(old)
    assert torch.allclose(fresh.m_weight, m.m_weight, atol=1e-4) and torch.allclose(fresh.m_bias, m.m_bias, atol=1e-4)
    assert int(fresh.phases) == 1


# ----------------------------------------------------------------------------- CustomKD: the moving customisation


EXAMPLES = 200 if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else 25


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True), min_size=1, max_size=6),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_row_memory_is_an_ema_of_the_softmax_per_tracked_row(batches, momentum, seed):
    """Any sequence of batches: a tracked row holds the EMA of its softmax (the first one as is), an
    untracked row is never recorded, and the record survives the checkpoint's round trip."""
    tracked = np.array([1, 4, 5, 8])
    mem = RowMemory(C, momentum)
    mem.track(tracked, 10)
    g = torch.Generator().manual_seed(seed)
    expect = {}
    for rows in batches:
        logits = torch.randn(len(rows), C, generator=g)
        mem.update(torch.tensor(rows), logits)
        for r, p in zip(rows, F.softmax(logits, 1)):
            if r in tracked:
                expect[r] = p if r not in expect else momentum * expect[r] + (1 - momentum) * p
    probs, seen = mem.table()
    for i, r in enumerate(tracked):
        assert seen[i] == (r in expect)
        assert np.allclose(probs[i], expect[r].numpy() if r in expect else 0, atol=1e-6)
    got, got_seen = mem.lookup(torch.arange(10), torch.device("cpu"))
    assert all(got_seen[r] == 0 for r in range(10) if r not in tracked)
    again = RowMemory(C, momentum)
    again.track(tracked, 10)
    again.set_extra_state(mem.get_extra_state())
    assert all(np.array_equal(a, b) for a, b in zip(again.table(), mem.table()))


def test_row_memory_refuses_a_record_of_other_rows_and_takes_an_empty_one():
    mem = RowMemory(C)
    mem.track(np.arange(4), 6)
    mem.set_extra_state(torch.zeros(0, C + 1))  # saved before anything was tracked: nothing to restore
    assert len(mem) == 4 and not mem.table()[1].any()
    with pytest.raises(ValueError, match="tracks 4 rows"):
        mem.set_extra_state(torch.zeros(5, C + 1))


def _record(m, ctx, logits_of_row):
    """Training steps over every unlabelled row, the student predicting `logits_of_row` for each."""
    rows = np.flatnonzero(ctx.scenario.unlabelled)
    m.train()
    out = StudentOutput(torch.zeros(len(rows), m.dims.student), torch.zeros(len(rows), m.dims.student),
                        torch.from_numpy(logits_of_row[rows]).float(), None)
    feats = torch.from_numpy(ctx.store.features[rows, 0])
    m(out, TeacherBatch(feats, rows=torch.from_numpy(rows)), torch.full((len(rows),), -1))


def test_customkd_moving_customisation_follows_the_student_record():
    """From the second phase on, the refit's pseudo-labels mix the previous customised teacher with the
    student's recorded predictions: a student that is right where the teacher is wrong pulls the customised
    teacher towards the truth; with student_weight=0 (the teacher-only chain) nothing is recorded."""
    ctx, dims, feats, labels = _customkd_ctx()
    wrong = np.roll(np.eye(C)[labels], 1, axis=1) * 10  # a teacher wrong on every unlabelled row
    ctx.teacher_logits = lambda mask, view=None: wrong[mask][:, None].repeat(feats.shape[1], 1) \
        if view is None else wrong[mask]
    right = np.eye(C)[labels] * 10
    acc = {}
    for weight in (0.0, 0.9):
        moving = dict(move_from=0.0, record="train") if weight else {}  # the chain reads neither
        m = create_method("customkd", dims, student_weight=weight, first_rounds=1, sharpen=1.0, balance=False,
                          w_self=0.0, **moving)
        m.prepare(ctx)
        first = m.before_epoch(ctx, 0)
        _record(m, ctx, right)
        acc[weight] = (first, m.before_epoch(ctx, 1))
        assert len(m.memory) == (0 if weight == 0 else int(ctx.scenario.unlabelled.sum()))
    assert acc[0.9][0]["custom_teacher_eval_top1"] == acc[0.0][0]["custom_teacher_eval_top1"] < 0.5  # phase 1 alike
    assert acc[0.9][1]["custom_teacher_eval_top1"] > 0.9 > acc[0.0][1]["custom_teacher_eval_top1"]
    assert acc[0.9][1]["student_record_eval_top1"] == 1.0


def test_customkd_clean_record_takes_the_students_clean_view_predictions():
    """record=clean: the training steps leave the record alone, and the end of an epoch fills it with the
    student's predictions on the clean view of exactly the recorded (unlabelled) rows, which the next refit
    reads; a context without those predictions is an error that names the option."""
    ctx, dims, feats, labels = _customkd_ctx()
    right = np.eye(C)[labels] * 10
    asked = []

    def predict_clean(mask):
        asked.append(mask.copy())
        rows = np.flatnonzero(mask)
        return rows, right[rows].astype(np.float32)

    m = create_method("customkd", dims, student_weight=0.9, move_from=0.0, record="clean", first_rounds=1, w_self=0.0,
                      memory_momentum=0.0)
    m.prepare(ctx)
    m.before_epoch(ctx, 0)
    _record(m, ctx, np.roll(right, 1, axis=1))  # training steps: wrong predictions, not recorded
    assert m.memory.table()[1].sum() == 0
    with pytest.raises(ValueError, match="record=clean"):
        m.end_epoch(ctx, 0)
    ctx.predict_clean = predict_clean
    m.end_epoch(ctx, 0)
    with pytest.raises(MethodError, match="record=train"):  # nothing would read it
        create_method("customkd", dims, record="train", student_weight=0.0, w_self=0.0)
    assert len(asked) == 1 and np.array_equal(asked[0], ctx.scenario.unlabelled)
    probs, seen = m.memory.table()
    assert seen.all() and (probs.argmax(1) == labels[ctx.scenario.unlabelled]).all()
    assert m.before_epoch(ctx, 1)["student_record_eval_top1"] == 1.0


def test_customkd_moving_customisation_without_a_record_is_the_teacher_chain():
    """A row the student has not been recorded on keeps the customised teacher's prediction: with no record
    at all, the moving customisation's phases are the teacher-only chain's (the first one read from the same
    place; the later refits start from the previous classifier, and reach the same minimum of the same
    convex objective)."""
    ctx, dims, *_ = _customkd_ctx(shift=1.0)
    chain = create_method("customkd", dims, student_weight=0.0)
    moving = create_method("customkd", dims, student_weight=0.5, move_from=0.0, refit_iters=100)
    for m in (chain, moving):
        m.prepare(ctx)
    for epoch in range(3):
        chain.before_epoch(ctx, epoch)
        moving.before_epoch(ctx, epoch)
        assert torch.allclose(chain.m_weight, moving.m_weight, atol=1e-2)
        assert torch.allclose(chain.m_bias, moving.m_bias, atol=1e-2)
        assert torch.equal(chain.m_weight, moving.m_weight) == (epoch == 0)


def test_customkd_self_training_term_targets_confident_records_of_unlabelled_rows():
    """CE to the recorded argmax, only where the record is confident and the row unlabelled, averaged over
    the batch's unlabelled rows; the step then folds its own prediction into the record."""
    ctx, dims, feats, labels = _customkd_ctx()
    m = create_method("customkd", dims, w_self=1.0, self_threshold=0.9, memory_momentum=0.0, student_weight=0.0,
                      record="train")
    m.prepare(ctx)
    rows = torch.from_numpy(np.flatnonzero(ctx.scenario.unlabelled)[:4])
    m.memory.update(rows[:3], torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [1.0, 1.0, 1.0]]))  # 2 confident, 1 not
    out = StudentOutput(torch.zeros(4, dims.student), torch.zeros(4, dims.student), torch.randn(4, C, requires_grad=True),
                        None)
    y = torch.tensor([-1, 1, -1, -1])  # the second row is labelled: never a self-training target
    m.train()
    parts = m(out, TeacherBatch(torch.from_numpy(feats[rows.numpy(), 0]).float(), rows=rows), y)
    expect = F.cross_entropy(out.logits[:1], torch.tensor([0])) / 3
    assert torch.allclose(parts["self"], expect, atol=1e-6)
    parts["self"].backward()
    assert out.logits.grad[0].abs().sum() > 0 and out.logits.grad[1:].abs().sum() == 0
    probs, seen = m.memory.lookup(rows, torch.device("cpu"))
    assert seen.tolist() == [1, 1, 1, 1] and torch.allclose(probs, F.softmax(out.logits.detach(), 1))


def test_customkd_record_and_its_targets_leave_mixed_views_out():
    """A mixed view (mix_lam < 1) shows a blend with another row's image: the student's prediction on it is not
    recorded, the row's record is not its self-training target, and its customised target is not bootstrapped
    towards the record (it stays the customised teacher's prediction on the blend's feature)."""
    from kdcache.methods.base import kd_loss

    ctx, dims, feats, labels = _customkd_ctx()
    m = create_method("customkd", dims, w_self=1.0, self_threshold=0.9, bootstrap=1.0, memory_momentum=0.0,
                      student_weight=0.0, w_general=0.0, record="train")
    m.prepare(ctx)
    m.before_epoch(ctx, 0)
    rows = torch.from_numpy(np.flatnonzero(ctx.scenario.unlabelled)[:4])
    m.memory.update(rows, torch.eye(C)[[0, 1, 2, 0]] * 9)  # a confident record of every row
    p, seen = (a.clone() for a in m.memory.lookup(rows, torch.device("cpu")))
    lam = torch.tensor([1.0, 0.3, 1.0, 0.7])  # the second and fourth views are mixed
    f = torch.from_numpy(feats[rows.numpy(), 0]).float()
    out = StudentOutput(torch.zeros(4, dims.student), torch.zeros(4, dims.student),
                        torch.randn(4, C, generator=torch.Generator().manual_seed(0), requires_grad=True), None)
    m.train()
    parts = m(out, TeacherBatch(f, rows=rows, extra={"mix_lam": lam, "mix_label": torch.full((4,), -1)}),
              torch.full((4,), -1))
    own = torch.tensor([0, 2])
    expect = F.cross_entropy(out.logits[own], p[own].argmax(1), reduction="sum") / 4
    assert torch.allclose(parts["self"], expect, atol=1e-6)
    q = F.softmax(m.customised_logits(f), 1)
    weight = (seen * p.max(1).values * (lam >= 1))[:, None]
    target = q ** (1 - weight) * p.clamp_min(1e-6) ** weight
    assert torch.equal(target[[1, 3]], q[[1, 3]]) and not torch.allclose(target[own], q[own])
    assert torch.allclose(parts["custom"], kd_loss(out.logits, torch.log(target / target.sum(1, keepdim=True)),
                                                   m.params["custom_temperature"]), atol=1e-5)
    parts["self"].backward()
    assert out.logits.grad[[1, 3]].abs().sum() == 0 and out.logits.grad[own].abs().sum() > 0
    after, _ = m.memory.lookup(rows, torch.device("cpu"))
    assert torch.equal(after[[1, 3]], p[[1, 3]])  # the mixed views' predictions are not recorded
    assert torch.allclose(after[own], F.softmax(out.logits.detach()[own], 1))


def test_customkd_anchored_refit_mixes_the_record_with_the_first_customisation_only():
    """With `anchor`, every moving refit takes its teacher side from the first customisation, so a fixed
    record gives the same pseudo-labels phase after phase (the phases settle: nothing compounds), and the
    refit equals one fit from those pseudo-labels; without it, each phase mixes the record into the
    previous phase's predictions again."""
    from kdcache.adapt import predict_views, self_train_head

    ctx, dims, feats, labels = _customkd_ctx(shift=1.0)
    noisy = np.eye(C)[labels] * 3 + np.random.default_rng(1).normal(size=(len(labels), C)) * 2
    phases = {}
    for anchor in (False, True):
        m = create_method("customkd", dims, student_weight=0.5, move_from=0.0, refit_threshold=0.0, anchor=anchor,
                          record="train",
                          refit_iters=100, memory_momentum=0.0)
        m.prepare(ctx)
        m.before_epoch(ctx, 0)
        first = (m.m_weight.clone(), m.m_bias.clone())
        _record(m, ctx, noisy)
        phases[anchor] = []
        for epoch in range(1, 4):
            m.before_epoch(ctx, epoch)
            phases[anchor].append((m.m_weight.clone(), m.m_bias.clone()))
        if anchor:  # the second and later anchored refits: one fit from the same pseudo-labels
            d = m._data
            z = torch.from_numpy(predict_views(d["f_u"].reshape(-1, DT), first[0].numpy(), first[1].numpy(), 2))
            probs, seen = (torch.from_numpy(a) for a in m.memory.table())
            mixed = z + 0.5 * (seen * probs.max(1).values)[:, None] * (torch.log(probs.clamp_min(1e-6)) - torch.log_softmax(z, 1))
            w, b = self_train_head(d["f_l"], d["y_l"], d["f_u"], mixed.numpy(), C, 1, 0.5, True, 1e-3, 1.0, 100)
            assert torch.allclose(phases[True][-1][0], torch.from_numpy(w), atol=2e-2)
    step = {a: float((phases[a][-1][0] - phases[a][-2][0]).abs().max()) for a in phases}
    assert step[True] < 0.02 < step[False], step


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.floats(0.05, 1.0), st.integers(0, 2**16))
def test_customkd_bootstrapped_target_moves_each_unlabelled_row_towards_its_record(weight, seed):
    """bootstrap=w: the customised term distils each recorded unlabelled row towards q^(1 - lam) p^lam
    (q the customised teacher's softmax, p the student's record, lam = w times the record's confidence);
    a labelled row and an unseen row keep q."""
    from kdcache.methods.base import kd_loss

    ctx, dims, feats, labels = _customkd_ctx()
    m = create_method("customkd", dims, bootstrap=weight, memory_momentum=0.0, w_general=0.0)
    m.prepare(ctx)
    m.before_epoch(ctx, 0)
    g = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(np.concatenate([[0, 1], np.flatnonzero(ctx.scenario.unlabelled)[:4]]))  # 2 labelled
    m.memory.update(rows[2:5], torch.randn(3, C, generator=g) * 3)  # the last unlabelled row stays unseen
    f = torch.from_numpy(feats[rows.numpy(), 0]).float()
    out = StudentOutput(torch.zeros(6, dims.student), torch.zeros(6, dims.student), torch.randn(6, C, generator=g), None)
    p, seen = (a.clone() for a in m.memory.lookup(rows, torch.device("cpu")))  # the record the step reads
    m.train()
    parts = m(out, TeacherBatch(f, rows=rows), torch.tensor([labels[0], labels[1], -1, -1, -1, -1]))
    q = F.softmax(m.customised_logits(f), 1)
    lam = (weight * seen * p.max(1).values)[:, None]
    target = q ** (1 - lam) * p.clamp_min(1e-6) ** lam
    assert torch.equal(target[[0, 1, 5]], q[[0, 1, 5]])
    expect = kd_loss(out.logits, torch.log(target / target.sum(1, keepdim=True)), m.params["custom_temperature"])
    assert torch.allclose(parts["custom"], expect, atol=1e-5)


def test_customkd_bootstrapped_target_is_reported_beside_the_customised_teacher():
    """A right record pulls the bootstrapped target of a wrong teacher to the truth: the report gives the target's
    top-1 on the evaluation rows beside the customised classifier's, which the bootstrap leaves alone."""
    ctx, dims, feats, labels = _customkd_ctx()
    wrong = np.roll(np.eye(C)[labels], 1, axis=1) * 10
    ctx.teacher_logits = lambda mask, view=None: wrong[mask][:, None].repeat(feats.shape[1], 1) \
        if view is None else wrong[mask]
    m = create_method("customkd", dims, bootstrap=1.0, first_rounds=1, sharpen=1.0, balance=False, student_weight=0.0,
                      record="train")
    m.prepare(ctx)
    first = m.before_epoch(ctx, 0)
    assert "custom_target_eval_top1" not in first  # nothing recorded yet
    _record(m, ctx, np.eye(C)[labels] * 10)
    later = m.before_epoch(ctx, 1)
    assert later["custom_target_eval_top1"] == 1.0 > later["custom_teacher_eval_top1"]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 2**16), st.integers(0, 6))
def test_information_maximisation_reads_the_unlabelled_rows_only(seed, labelled):
    """The term is the mean entropy minus the entropy of the mean over the unlabelled rows alone; a labelled row
    changes nothing and gets no gradient; a batch without unlabelled rows gives 0."""
    from kdcache.methods.customkd import information_maximisation

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(6, C, generator=g) * 3).requires_grad_()
    mask = (torch.arange(6) >= labelled).float()
    got = information_maximisation(logits, mask)
    u = F.softmax(logits.detach()[labelled:], 1)
    if len(u):
        mean = u.mean(0)
        expect = -(u * u.log()).sum(1).mean() + (mean * mean.log()).sum()
        assert torch.allclose(got, expect, atol=1e-5)
    else:
        assert got == 0
    got.backward()
    assert logits.grad[:labelled].abs().sum() == 0


def test_information_maximisation_prefers_confident_predictions_spread_over_the_classes():
    confident_spread = torch.eye(C) * 20
    confident_collapsed = torch.zeros(C, C)
    confident_collapsed[:, 0] = 20
    flat = torch.zeros(C, C)
    from kdcache.methods.customkd import information_maximisation

    ones = torch.ones(C)
    assert information_maximisation(confident_spread, ones) < information_maximisation(flat, ones)
    assert information_maximisation(confident_spread, ones) < information_maximisation(confident_collapsed, ones)
