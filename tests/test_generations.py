"""A student beyond its target: row-level targets with student-side noise, an averaged student (EMA) and a second
generation (`--from-run`), each checked for what the student is given and for exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kdcache.adapt import pseudo_targets
from kdcache.cache.format import CacheError
from kdcache.methods import MethodError
from kdcache.methods.base import kd_loss, parse_method_options
from kdcache.methods.targets import RowTable, RowTargets, row_pseudo_labels
from kdcache.options import ConfigError
from kdcache.stages import distill, extract
from kdcache.students import create_student
from kdcache.train import run_dir
from kdcache.train.ema import AveragedStudent, warmed_decay

N, CLASSES, S, V = 200, 6, 64, 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("generations")  # a seeded random teacher: what is checked is not accuracy
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N), ("classes", CLASSES)),
                                teacher="test_efficientnet", random_init=True, teacher_input_size=32,
                                views=V, shard_size=S, batch_size=64, workers=0, out=str(tmp / "cache"),
                                progress=False)
    return extract.run(cfg)


def _cfg(cache, out, **kw) -> distill.DistillConfig:
    base = dict(cache=str(cache), student="test_efficientnet", image_size=32, scenario="ssl", labels_per_class=3,
                method="customkd", epochs=3, batch_size=32, lr=3e-3, workers=0, out=str(out), progress=False, seed=2)
    base.update(kw)
    return distill.DistillConfig(**base)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- row-level targets


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.booleans())
def test_row_target_is_the_sharpened_balanced_view_mean_and_every_view_of_a_row_reads_it(seed, weight, with_prev):
    """Each tracked row's target is pseudo_targets of its mean logits (mixed with the first student's probabilities
    when given); a batch's unmixed views of tracked rows read their row's target at temperature 1, every other view
    (untracked rows, mixed views) its own target at the term's temperature."""
    g = torch.Generator().manual_seed(seed)
    n_rows, tracked, classes = 12, np.array([1, 4, 5, 9]), 5
    mean = torch.randn(len(tracked), classes, generator=g) * 3
    prev = F.softmax(torch.randn(len(tracked), classes, generator=g), 1)
    t = RowTargets(True, 0.5, True)
    t.track(tracked, n_rows, classes)
    if with_prev:  # the first student's table, as load_previous sets it
        t.previous, t.weight = RowTable(tracked, n_rows, classes), weight
        t.previous.set(prev)
    t.refresh(mean, np.full(len(tracked), -1))
    logits_for_q = mean if not with_prev else mean + weight * (torch.log(prev.clamp_min(1e-6)) - F.log_softmax(mean, 1))
    q = torch.from_numpy(pseudo_targets(logits_for_q.numpy(), 0.5, True))
    assert torch.allclose(t.targets.probs[:-1], q, atol=1e-5)

    rows = torch.tensor([1, 1, 4, 0, 9, 3])  # two views of row 1; rows 0 and 3 are not tracked
    own = torch.tensor([True, True, True, True, False, True])  # row 9's view is mixed
    z_s = torch.randn(len(rows), classes, generator=g)
    view_target = torch.randn(len(rows), classes, generator=g)
    got = t.loss(z_s, view_target, 4.0, rows, own)
    slot = {1: 0, 4: 1, 5: 2, 9: 3}
    parts = []
    for i, r in enumerate(rows.tolist()):
        if r in slot and own[i]:
            target = q[slot[r]]
            parts.append((target * (target.clamp_min(1e-8).log() - F.log_softmax(z_s[i], 0))).sum())
        else:
            parts.append(kd_loss(z_s[i:i + 1], view_target[i:i + 1], 4.0))
    assert torch.allclose(got, torch.stack(parts).mean(), atol=1e-5)


def test_row_pseudo_labels_without_a_first_student_are_the_customisations_pseudo_labels():
    logits = torch.randn(7, 4) * 2
    q = row_pseudo_labels(logits, 0.5, True)
    assert np.allclose(q.numpy(), pseudo_targets(logits.numpy(), 0.5, True))
    assert torch.allclose(row_pseudo_labels(logits, 0.5, True, F.softmax(torch.randn(7, 4), 1), 0.0), q)


def test_target_row_needs_the_customised_term():
    assert parse_method_options("customkd", {"target": "row"})["target"] == "row"
    with pytest.raises(MethodError, match="target"):
        parse_method_options("customkd", {"target": "row", "w_custom": 0})
    with pytest.raises(MethodError, match="choose one of view, row"):
        parse_method_options("customkd", {"target": "rows"})


def _stop_after_first_epoch(monkeypatch):
    class Stop(Exception):
        pass

    real = run_dir.save_checkpoint

    def save_then_stop(path, epoch, *a, **k):
        out = real(path, epoch, *a, **k)
        if epoch == 0:
            raise Stop
        return out

    monkeypatch.setattr(run_dir, "save_checkpoint", save_then_stop)
    return Stop, real


def test_row_targets_with_student_noise_and_an_averaged_student_resume_exactly(cache, tmp_path, monkeypatch):
    """target=row, --drop-rate and --ema together: the run logs the row targets' own top-1 each epoch, evaluates the
    averaged student (eval) and the trained weights (eval_trained), exports the averaged weights, and a run stopped
    after its first epoch and resumed ends bit-identical to an uninterrupted one."""
    kw = dict(method_options=(("target", "row"),), drop_rate=0.2, ema=0.9)
    distill.run(_cfg(cache, tmp_path / "ref", **kw))
    stop, real = _stop_after_first_epoch(monkeypatch)
    with pytest.raises(stop):
        distill.run(_cfg(cache, tmp_path / "run", **kw))
    monkeypatch.setattr(run_dir, "save_checkpoint", real)
    distill.run(_cfg(cache, tmp_path / "run", resume=True, **kw))
    ref, run = _records(tmp_path / "ref"), _records(tmp_path / "run")
    keys = ("loss", "custom", "row_target_top1", "eval", "eval_trained")
    assert [[r.get(k) for k in keys] for r in ref] == [[r.get(k) for k in keys] for r in run]
    assert all(0 <= r["row_target_top1"] <= 1 for r in ref)
    for name in ("student.safetensors", "method.safetensors"):
        assert _same_tensors(tmp_path / "ref" / name, tmp_path / "run" / name), name
    last = tmp_path / "ref" / "checkpoints" / "epoch-0002"
    assert _same_tensors(tmp_path / "ref" / "student.safetensors", last / "ema.safetensors")
    assert not _same_tensors(last / "ema.safetensors", last / "student.safetensors")  # the average is its own
    # resuming without the average it was started with is refused, naming the flag
    with pytest.raises((CacheError, ConfigError), match="ema"):
        distill.run(_cfg(cache, tmp_path / "run", resume=True, epochs=4, method_options=(("target", "row"),),
                         drop_rate=0.2))


def test_view_targets_are_unchanged_by_the_row_machinery():
    """The default (target=view, no first student) computes the customised term as before: kd_loss over the batch
    (the row machinery is not even active)."""
    from kdcache.methods import create_method
    from kdcache.methods.base import Dims

    m = create_method("customkd", Dims(8, 16, CLASSES))
    assert not m.targets.active


# ----------------------------------------------------------------------------- the averaged student


def test_averaged_student_follows_the_warmed_up_average_of_the_weights():
    torch.manual_seed(0)
    student = create_student("test_efficientnet", 4)
    ema = AveragedStudent(student, 0.99)
    expected = {k: v.clone() for k, v in student.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()
        student(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))  # moves the BN running statistics
        ema.update(student)
        d = warmed_decay(0.99, step)
        for k, v in student.state_dict().items():
            expected[k] = expected[k] * d + v * (1 - d) if v.is_floating_point() else v.clone()
    got = ema.student.state_dict()
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-5) for k in expected)
    assert warmed_decay(0.99, 0) == pytest.approx(0.1) and warmed_decay(0.99, 10_000) == 0.99
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.student.training  # the average is never trained


def test_drop_rate_reaches_the_student_and_out_of_range_is_refused():
    s = create_student("test_efficientnet", 4, drop_rate=0.3)
    assert getattr(s.model, "drop_rate", None) == 0.3
    with pytest.raises(ConfigError, match="--drop-rate"):
        distill.check_config(distill.DistillConfig(drop_rate=1.5))
    with pytest.raises(ConfigError, match="--ema"):
        distill.check_config(distill.DistillConfig(ema=1.0))


# ----------------------------------------------------------------------------- a second generation


def test_second_generation_reads_the_first_students_predictions(cache, tmp_path, monkeypatch):
    """--from-run: the first run's student predicts the clean view of every unlabelled row once; its top-1 on them
    is logged; the targets mix it in, so the second student differs from one trained without it; a run of another
    cache, or a method without a customised target, is refused with the flag named."""
    first = distill.run(_cfg(cache, tmp_path / "first", epochs=2))
    calls = []
    from kdcache.methods.targets import RowTargets as RT

    real = RT.load_previous

    def load_previous(self, predict, weight, labels):
        calls.append(weight)
        return real(self, predict, weight, labels)

    monkeypatch.setattr(RT, "load_previous", load_previous)
    second = distill.run(_cfg(cache, tmp_path / "second", epochs=2, from_run=str(first), from_run_weight=0.7,
                              method_options=(("target", "row"),)))
    plain = distill.run(_cfg(cache, tmp_path / "plain", epochs=2, method_options=(("target", "row"),)))
    assert calls == [0.7]
    rec = _records(second)
    assert "previous_student_top1" in rec[0] and 0 <= rec[0]["previous_student_top1"] <= 1
    assert rec[0]["row_target_top1"] != _records(plain)[0]["row_target_top1"] or \
        rec[0]["custom"] != _records(plain)[0]["custom"]
    with pytest.raises(ConfigError, match="--from-run"):
        distill.check_config(_cfg(cache, tmp_path / "x", method="kd", from_run=str(first)))
    with pytest.raises(ConfigError, match="--from-run-weight"):
        distill.check_config(_cfg(cache, tmp_path / "x", from_run_weight=0.3))
    other = extract.run(extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", 64), ("classes", CLASSES)),
                                              teacher="test_efficientnet", random_init=True,
                                              teacher_input_size=32, views=1, shard_size=S, batch_size=64, workers=0, out=str(tmp_path / "other"),
                                              progress=False))
    with pytest.raises(CacheError, match="--from-run .*another cache"):
        distill.run(_cfg(other, tmp_path / "y", epochs=1, labels_per_class=1, from_run=str(first)))
