"""Mixed views (extract --mix): recorded as numbers, replayed pixel for pixel, and learnt from by every method."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_cache, read_all, run_cli
from hypothesis import given
from hypothesis import strategies as st

import kdcache.extraction as extraction
from kdcache import mixing
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.images import decode_packed
from kdcache.methods.base import labelled_ce, mixed_ce
from kdcache.options import check_fields
from kdcache.pack import read_shard, shard_name
from kdcache.stages import distill, extract
from kdcache.train.loader import CacheStream, StreamConfig
from kdcache.views import apply

N, CLASSES, S, V = 48, 4, 16, 4


def _extract_cfg(out: Path, **kw) -> extract.ExtractConfig:
    base = dict(dataset="synthetic", dataset_options=(("n", N), ("classes", CLASSES)), teacher="test_vit",
                random_init=True, views=V, shard_size=S, batch_size=16, workers=0, out=str(out), progress=False,
                mix="both", mix_prob=0.8)
    base.update(kw)
    if base["mix"] == "none" and "mix_prob" not in kw:
        base["mix_prob"] = 0.5  # the default: mixing settings without mixing are refused
    return extract.ExtractConfig(**base)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A mixed cache, and every batch the teacher saw while extracting it: (row, view) -> uint8 pixels."""
    tmp = tmp_path_factory.mktemp("mix")
    seen = {}
    real = extraction._teacher_inputs

    def record(batch, spec, device, late_bad, stats):
        images, rows, views = real(batch, spec, device, late_bad, stats)
        first = spec.layout.rows(int(batch["shard"])).start
        for img, r, v in zip(images, rows, views):
            seen[(first + int(r), int(v))] = img.clone()
        return images, rows, views

    extraction._teacher_inputs = record
    try:
        path = extract.run(_extract_cfg(tmp / "cache"))
    finally:
        extraction._teacher_inputs = real
    return path, seen


def _stream_all(cache: Path, **kw) -> list[dict]:
    store = CacheStore.open(cache)
    reps = np.ones(store.layout.n, np.int32)
    cfg = StreamConfig(str(cache), image_size=kw.pop("image_size", 24), seed=1, shuffle_buffer=1, **kw)
    return list(CacheStream(cfg, list(range(store.layout.num_shards)), reps, store.array("labels")[:], 0))


def test_a_mixed_view_replays_at_training_what_the_teacher_saw(mixed):
    cache, seen = mixed
    store = CacheStore.open(cache)
    pre = store.meta.section("teacher")["preprocess"]
    samples = _stream_all(cache, teacher_size=pre["input_size"], teacher_interpolation=pre["interpolation"])
    mix = store.array("mix")[:]
    kinds = set()
    for s in samples:
        row, view = int(s["row"]), int(s["view"])
        assert torch.equal(s["teacher_image"], seen[(row, view)])  # pixel for pixel
        record = mix[row, view]
        kinds.add(int(record[0]))
        assert float(s["mix_lam"]) == pytest.approx(mixing.lam_of(record))
    assert {mixing.MIXUP, mixing.CUTMIX} <= kinds
    # the student's size: the same mix of the same two views, by the one mixing function
    views = store.array("views")[:]
    packed = {r: d for k in range(store.layout.num_shards) for r, _, d in read_shard(store.images_dir / shard_name(k))}
    checked = 0
    for s in samples:
        row, view = int(s["row"]), int(s["view"])
        record = mix[row, view]
        if not mixing.is_mixed(record):
            continue
        first = row // S * S
        own = apply(decode_packed(packed[row], store.meta.image_bound), views[row, view], 24)
        other = apply(decode_packed(packed[mixing.partner_row(record, first)], store.meta.image_bound),
                      mixing.partner_view(record), 24)
        mixed_pixels = mixing.mix_pixels(own, other, record)
        assert torch.equal(s["image"], mixed_pixels)
        if mixing.lam_of(record) < 0.99:  # a mixup of lambda near 1 may round to the view's own pixels
            assert not torch.equal(mixed_pixels, own)
        checked += 1
    assert checked > 10


def test_partners_are_other_rows_of_the_same_shard_and_view_0_is_never_mixed(mixed):
    store = CacheStore.open(mixed[0])
    mix = store.array("mix")[:]
    assert mix.shape == (N, V, mixing.M) and mix.dtype == np.float32
    assert not mix[:, 0, 0].any()
    for row in range(N):
        first, size = row // S * S, len(store.layout.rows(row // S))
        for v in range(1, V):
            record = mix[row, v]
            if not mixing.is_mixed(record):
                assert record[2] == 1.0
                continue
            partner = mixing.partner_row(record, first)
            assert first <= partner < first + size and partner != row
            assert 0 <= record[2] <= 1
            if int(record[0]) == mixing.CUTMIX:
                x0, y0, x1, y1 = record[3:7]
                assert record[2] == pytest.approx(1 - (x1 - x0) * (y1 - y0), abs=1e-6)
    mixed_share = (mix[:, 1:, 0] > 0).mean()
    assert 0.6 < mixed_share < 0.95  # --mix-prob 0.8
    assert store.meta.section("views")["mix"]["mode"] == "both"


def test_a_default_cache_has_no_mix_array_nor_record(tmp_path):
    path = extract.run(_extract_cfg(tmp_path / "plain", mix="none", views=2))
    store = CacheStore.open(path)
    assert "mix" not in read_all(path) and not store.has("mix")
    assert "mix" not in store.meta.section("views") and "mix_params" not in store.attrs["layout"]
    assert "mix_label" not in _stream_all(path)[0]


def test_resumed_and_split_extractions_give_identical_mixed_arrays(mixed, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(mixed[0], resumed)
    store = CacheStore.open(resumed, mode="r+")
    store.mark_todo(1)
    store.group["mix"][S:2 * S] = np.zeros((S, V, mixing.M), np.float32)
    extract.run(_extract_cfg(resumed))
    assert_same_cache(mixed[0], resumed)
    split = tmp_path / "split"
    for part in ("1/2", "0/2"):
        extract.run(_extract_cfg(split, part=part))
    assert_same_cache(mixed[0], split)


def test_other_mix_settings_are_not_mixed_up_with_a_cache(mixed, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mixed[0], copy)
    with pytest.raises(CacheError, match="views.mix"):
        extract.run(_extract_cfg(copy, mix_prob=0.3))
    with pytest.raises(CacheError, match="views.mix"):
        extract.run(_extract_cfg(copy, mix="none"))


@given(mode=st.sampled_from(mixing.MIX_MODES + ("blend", "MIXUP", "")),
       prob=st.floats(-1, 2, allow_nan=False), alpha=st.floats(-2, 5, allow_nan=False))
def test_mix_options_are_checked_and_errors_name_the_flag(mode, prob, alpha):
    cfg = _extract_cfg(Path("unused"), mix=mode, mix_prob=prob, mix_alpha=alpha)
    ok_mode, ok_prob, ok_alpha = mode in mixing.MIX_MODES, 0 <= prob <= 1, alpha > 0
    if ok_mode and ok_prob and ok_alpha:
        check_fields(cfg)
        return
    flag = "--mix " if not ok_mode else "--mix-prob" if not ok_prob else "--mix-alpha"
    with pytest.raises(ValueError, match=flag):
        check_fields(cfg)


def test_mixing_refuses_device_decoding_and_the_cli_names_the_flag(tmp_path, tiny_args):
    with pytest.raises(ValueError, match="--decode workers"):
        extract.run(_extract_cfg(tmp_path / "c", decode="device"))
    with pytest.raises(ValueError, match="--views 2 or more"):  # one view: only the clean one, never mixed
        extract.run(_extract_cfg(tmp_path / "one", views=1))
    assert not (tmp_path / "one").exists()
    for unused in ({"mix_prob": 0.3}, {"mix_alpha": 0.2}, {"mix_prob": 0.9, "mix_alpha": 2.0}):
        with pytest.raises(ValueError, match="but --mix is none") as err:  # no silent acceptance without mixing
            extract.run(_extract_cfg(tmp_path / "none", mix="none", **unused))
        assert all(f"--{name.replace('_', '-')}" in str(err.value) for name in unused)
    assert not (tmp_path / "none").exists()
    proc = run_cli("extract", *tiny_args, "--mix", "blend", "--out", str(tmp_path / "cli"), check=False)
    assert proc.returncode != 0 and "--mix" in proc.stdout + proc.stderr
    assert not (tmp_path / "cli").exists()


def test_a_mixed_cache_verifies_and_distils_with_kd_and_customkd(mixed, tmp_path):
    proc = run_cli("info", "--cache", str(mixed[0]), "--verify")
    assert "verify    ok" in proc.stdout + proc.stderr
    for method in ("kd", "customkd"):
        cfg = distill.DistillConfig(cache=str(mixed[0]), student="test_efficientnet", image_size=32, method=method,
                                    scenario="ssl", labels_per_class=4, epochs=1, batch_size=16, workers=0,
                                    out=str(tmp_path / method), progress=False)
        out = distill.run(cfg)
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert np.isfinite(rec["loss"]) and np.isfinite(rec["ce"]) and rec["eval"]["n"] > 0


def test_the_label_term_mixes_labels_by_lambda_and_an_unlabelled_partner_gives_none():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, -1, 2, 1])
    partner = torch.tensor([2, -1, 0, -1, 0])
    lam = torch.tensor([0.3, 0.6, 0.5, 1.0, 1.0])
    # no mixed view in the batch: exactly the unmixed term
    assert torch.equal(mixed_ce(logits, labels, torch.full((5,), -1), torch.ones(5)), labelled_ce(logits, labels))
    assert torch.equal(mixed_ce(logits, labels), labelled_ce(logits, labels))
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    ce_p = F.cross_entropy(logits, partner.clamp_min(0), reduction="none")
    want = (0.3 * ce[0] + 0.7 * ce_p[0] + 0.6 * ce[1] + ce[3] + ce[4] + 0.0) / 4  # row 2 is unlabelled
    got = mixed_ce(logits, labels, partner, lam)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("mode", ["none", "both"])
def test_the_online_teacher_proves_the_replay_of_every_drawn_view(mixed, tmp_path, mode):
    cache = mixed[0] if mode == "both" else extract.run(_extract_cfg(tmp_path / "plain", mix="none"))
    cfg = distill.DistillConfig(cache=str(cache), student="test_efficientnet", image_size=32, method="kd",
                                scenario="supervised", epochs=1, batch_size=16, workers=0, online_teacher=True, out=str(tmp_path / "online"), progress=False)
    summary = json.loads((distill.run(cfg) / "summary.json").read_text())
    proof = summary["replay_cosine"]
    assert proof["min"] >= 0.999 and proof["mean"] >= proof["min"]
    drawn = summary["counts"]["labelled"] + summary["counts"]["unlabelled"]  # one epoch: one draw per train row
    assert not summary["head"]["refit"] and proof["compared"] == 2 * drawn  # features and logits of each


def test_info_shows_the_views_in_a_picture_and_names_it_last(mixed, tmp_path):
    from PIL import Image

    from kdcache.viewpicture import default_picture_path, picture_size

    out = tmp_path / "pics" / "views.png"
    proc = run_cli("info", "--cache", str(mixed[0]), "--show-views", "3", "--views-out", str(out))
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    with Image.open(out) as im:
        assert im.size == picture_size(3, V, mixed=True)
    plain = extract.run(_extract_cfg(tmp_path / "nohead", mix="none", views=2, head="none"))
    proc = run_cli("info", "--cache", str(plain), "--show-views", "2")
    assert proc.stdout.strip().splitlines()[-1] == str(default_picture_path(plain)) == str(plain) + ".views.png"
    with Image.open(default_picture_path(plain)) as im:
        assert im.size == picture_size(2, 2, mixed=False)  # no partner column
    from kdcache.viewpicture import _caption

    assert _caption(CacheStore.open(plain), None, 0, 1) == "view 1: no head"


@given(size=st.integers(8, 64), lam=st.floats(0, 1), box=st.lists(st.floats(0, 1), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_mixing_pixels_is_a_blend_rounded_once_or_a_pasted_box(size, lam, box, seed):
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    other = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    record = mixing.unmixed(1)[0]
    assert torch.equal(mixing.mix_pixels(own, other, record), own)
    record[:3] = [mixing.MIXUP, 0, lam]
    blend = mixing.mix_pixels(own, other, record)
    lam32 = float(np.float32(lam))
    want = (own.double() * lam32 + other.double() * (1 - lam32))
    assert (blend.double() - want).abs().max() <= 0.5 + 1e-3
    x0, x1 = sorted(box[:2])
    y0, y1 = sorted(box[2:])
    record[:7] = [mixing.CUTMIX, 0, 1 - (x1 - x0) * (y1 - y0), x0, y0, x1, y1]
    cut = mixing.mix_pixels(own, other, record)
    px0, py0, px1, py1 = mixing.pixel_box(record, size)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[py0:py1, px0:px1] = True
    assert torch.equal(cut[:, inside], other[:, inside]) and torch.equal(cut[:, ~inside], own[:, ~inside])


@given(mode=st.sampled_from(mixing.MIX_MODES), prob=st.sampled_from([0.0, 0.3, 1.0]),
       alpha=st.floats(0.05, 8), row=st.integers(0, 40), views=st.integers(1, 6))
def test_drawn_mixes_follow_their_settings(mode, prob, alpha, row, views):
    first, candidates = 32, [32, 33, 35, 36, 38]
    sizes = {r: (20 + r, 30) for r in candidates}
    settings = mixing.MixSettings(mode, prob, alpha)
    rec = mixing.draw_mixes(first + row % 8, first, candidates, sizes, views, settings, "default", 7)
    again = mixing.draw_mixes(first + row % 8, first, candidates, sizes, views, settings, "default", 7)
    assert np.array_equal(rec, again) and rec.shape == (views, mixing.M)
    kinds = rec[:, 0].astype(int)
    assert kinds[0] == mixing.NONE
    if mode == "none" or prob == 0:
        assert not kinds.any()
    elif prob == 1:
        assert (kinds[1:] != mixing.NONE).all()
    if mode in ("mixup", "cutmix"):
        assert set(kinds[1:]) <= {mixing.NONE, mixing.MIXUP if mode == "mixup" else mixing.CUTMIX}
    for r in rec[kinds != mixing.NONE]:
        assert mixing.partner_row(r, first) in candidates and mixing.partner_row(r, first) != first + row % 8
        assert 0 <= r[2] <= 1


def test_a_mixed_draw_whose_partner_does_not_decode_is_unreadable_alone():
    from PIL import Image

    from kdcache.images import encode_packed
    from kdcache.replay import Replayed, Unreadable, replay_shard, stored_views

    rng = np.random.default_rng(0)
    packed = {r: encode_packed(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)))[1]
              for r in (0, 1)}
    packed[2] = b"not an image"
    views = np.stack([np.tile(np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0], np.float32), (2, 1))] * 3)
    mix = np.stack([mixing.unmixed(2)] * 3)
    mix[0, 1, :3] = [mixing.MIXUP, 2, 0.5]  # row 0, view 1: partner row 2 is damaged
    mix[1, 1, :3] = [mixing.MIXUP, 0, 0.5]
    got = list(replay_shard(packed, [(0, 0), (0, 1), (1, 1)], stored_views(views), [(16, "bicubic")],
                            mix_of=lambda r: mix[r]))
    assert [type(g) for g in got] == [Replayed, Unreadable, Replayed]
    assert "partner row 2" in got[1].reason


def _poisoned_copy(cache: Path, out: Path) -> np.ndarray:
    """A copy of `cache` whose mixed views' features (and cached logits) are reversed and scaled by 50, so that
    any fit or mean that reads a mixed view gives another result; returns the [N, V] mask of the mixed views."""
    shutil.copytree(cache, out)
    group = CacheStore.open(out, mode="r+").group
    mixed_views = group["mix"][:][..., 0] != mixing.NONE
    for name in ("features", "logits"):
        if name in group and group[name].dtype != np.int8:
            values = group[name][:]
            values[mixed_views] = -50 * values[mixed_views]
            group[name][...] = values
    return mixed_views


def test_customisation_and_teacher_adaptation_never_fit_a_mixed_view(mixed, tmp_path):
    """A mixed view's feature is of a blend and a row's (pseudo-)label speaks of its own image: CustomKD's
    customisation (teacher chain and the refit with the student's record) and `--teacher-adapt` fit on the views
    that are not mixed, so poisoning every mixed view leaves each fitted head exactly as it was."""
    from kdcache.adapt import self_train_head
    from kdcache.scenario_heads import scenario_teacher_head
    from kdcache.train import inputs

    clean = tmp_path / "clean"
    shutil.copytree(mixed[0], clean)
    mixed_views = _poisoned_copy(mixed[0], tmp_path / "poisoned")
    cfg = distill.DistillConfig(cache=str(clean), student="test_efficientnet", image_size=32, method="customkd",
                                method_options=(("student_weight", 0.5), ("move_from", 0.0), ("record", "train"),
                                                ("memory_momentum", 0.0), ("first_rounds", 2)),
                                scenario="ssl", labels_per_class=4, epochs=3, workers=0, out=str(tmp_path / "run"))
    fitted = {}
    for name in ("clean", "poisoned"):
        store = CacheStore.open(tmp_path / name, mode="r+")
        scenario = inputs.scenario_of(store, cfg)
        lab, unl = scenario.labelled, scenario.unlabelled
        assert mixed_views[lab].any() and mixed_views[unl].any() and not mixed_views[:, 0].any()
        adapted, info = scenario_teacher_head(store, scenario, adapt_rounds=2)
        head, _ = scenario_teacher_head(store, scenario)
        torch.manual_seed(0)
        student, method = inputs.student_and_method(cfg, store)
        ctx = inputs.method_context(store, scenario, student, method, head, torch.device("cpu"), 0, True, cfg.epochs)
        method.prepare(ctx)
        method.before_epoch(ctx, 0)  # the teacher chain's first customisation
        first = (method.m_weight.clone(), method.m_bias.clone())
        rows = torch.from_numpy(np.flatnonzero(unl))
        record = np.eye(CLASSES, dtype=np.float32)[np.arange(len(rows)) % CLASSES] * 5
        method.memory.update(rows, torch.from_numpy(record))
        method.before_epoch(ctx, 1)  # a refit with the student's record
        labels = store.array("labels")[:]
        every_view = self_train_head(store.masked(lab), labels[lab], store.masked(unl),
                                     ctx.teacher_logits(unl), CLASSES, rounds=2)  # a fit on every view
        fitted[name] = {"adapted": (adapted.weight.numpy(), adapted.bias.numpy()),
                        "first customisation": tuple(t.numpy() for t in first),
                        "refit with the record": (method.m_weight.numpy(), method.m_bias.numpy()),
                        "every view": every_view, "group": info["group"]}
    clean, poisoned = fitted["clean"], fitted["poisoned"]
    # the poison reaches any fit that reads the mixed views
    assert not np.allclose(poisoned["every view"][0], clean["every view"][0], atol=1e-3)
    for fit in ("adapted", "first customisation", "refit with the record"):
        for got, want in zip(poisoned[fit], clean[fit]):
            assert np.array_equal(got, want), fit
    # kept apart from the heads once fitted on every view of a mixed cache
    assert clean["group"] == poisoned["group"] and clean["group"].endswith("-adapt2-unmixed")
