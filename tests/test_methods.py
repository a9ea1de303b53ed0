"""Each method's loss on tiny tensors has its documented value, and gradients reach exactly the
parameters they should."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import MethodError, TeacherBatch, create_method, list_methods
from pipeline.methods.base import Dims
from pipeline.methods.feature import power_temperature_scaling
from pipeline.students import StudentOutput, create_student

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
    m = create_method("kdep", DIMS, temperature=1.0, power=2.0)
    with pytest.raises(MethodError, match="SVD"):
        m(out, t, y)
    mean, comps = torch.randn(DT), torch.linalg.qr(torch.randn(DT, DT))[0][: m.k]
    m.set_svd(mean, comps)
    z = (t.features - mean) @ comps.T
    target = torch.sign(z) * z.abs().sqrt()
    parts = m(out, t, y)
    assert m.k == min(DS, DT) == 5
    assert torch.allclose(parts["kdep"], F.mse_loss(out.pre_act[:, :5], target), atol=1e-6)
    parts["kdep"].backward()
    assert out.pre_act.grad.abs().sum() > 0 and out.feature.grad is None


def test_scalekd_needs_tokens_and_mimics_both_views():
    with pytest.raises(MethodError, match="extract .*--tokens"):
        create_method("scalekd", Dims(DS, DT, C, 7, 0, 0))
    out, t, y = _batch()
    m = create_method("scalekd", DIMS, heads=1)
    parts = m(out, t, y)
    pred = m.cap(out.feature_map)
    assert pred.shape == (B, 4, DT)
    dc = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    assert torch.allclose(parts["direct"], F.mse_loss(pred, t.tokens), atol=1e-6)
    assert torch.allclose(parts["ac"], F.mse_loss(dc(pred), dc(t.tokens)), atol=1e-6)
    (parts["direct"] + parts["ac"]).backward()
    assert out.feature_map.grad.abs().sum() > 0 and all(p.grad is not None for p in m.cap.parameters())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_customkd_phases_touch_the_right_parameters():
    torch.manual_seed(0)
    student = create_student("test_efficientnet", C)
    dims = Dims(student.dims(32)["feature"], DT, C)
    m = create_method("customkd", dims)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    t = TeacherBatch(torch.randn(B, DT))
    y = torch.tensor([0, 1, -1, 2])
    s_before, m_before = _snapshot(student), _snapshot(m)

    # (A) customisation: cached features only; P_t changes, nothing else
    opt_a = torch.optim.SGD(m.customisation_parameters(), lr=0.5)
    parts = m.customisation_loss(student.head, t.features, y)
    h = student.head
    expected = F.cross_entropy(h(m.p_t(t.features))[[0, 1, 3]], y[[0, 1, 3]])
    assert torch.allclose(parts["loss"], expected)
    parts["loss"].backward()
    assert all(p.grad is None for p in student.parameters())
    opt_a.step()
    assert _changed(s_before, student) == set()
    assert _changed(m_before, m) == {"p_t.weight", "p_t.bias"}

    # (B) distillation: the student and P_s change, P_t stays frozen
    m_mid = _snapshot(m)
    m.zero_grad(set_to_none=True)
    opt_b = torch.optim.SGD(list(student.parameters()) + m.distillation_parameters(), lr=0.5)
    student.train()
    parts = m(student(images), t, y)
    assert set(parts) == {"ce", "general", "custom", "loss"}
    opt_b.zero_grad()
    parts["loss"].backward()
    assert all(p.grad is None for p in m.p_t.parameters())
    opt_b.step()
    assert _changed(m_mid, m) == {"p_s.weight", "p_s.bias"}
    assert len(_changed(s_before, student)) > 0
