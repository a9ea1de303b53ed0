"""The teacher's speed settings, checked on the CPU: channels-last, torch.compile (batches padded to one
shape), and which attention kernels a teacher's blocks use."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, run_cli

from kdcache.teachers import TeacherError, attention_kernels, create_teacher


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
def test_channels_last_gives_the_same_features_within_float_tolerance(name):
    plain = create_teacher(name, random_init=True)
    tuned = create_teacher(name, random_init=True)
    tuned.tune(channels_last=True)
    x = _images(3, plain.preprocess.input_size)
    a, b = plain(x, token_grid=2), tuned(x, token_grid=2)
    assert tuned.channels_last and not plain.channels_last
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)


def test_a_compiled_teacher_sees_one_batch_shape_and_returns_only_the_real_rows(monkeypatch):
    shapes = []

    def fake_compile(fn, mode=None, dynamic=None):  # eager, recording what the compiled graph would see
        assert mode == "reduce-overhead" and dynamic is False

        def run(x, want_tokens):
            shapes.append(tuple(x.shape))
            return fn(x, want_tokens=want_tokens)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = create_teacher("test_vit", random_init=True)
    tuned = create_teacher("test_vit", random_init=True)
    tuned.tune(compile_mode="reduce-overhead", batch_size=5)
    s = plain.preprocess.input_size
    for n in (5, 2, 1):
        x = _images(n, s, seed=n)
        a, b = plain(x, token_grid=2), tuned(x, token_grid=2)
        assert set(a) == set(b)
        for k in a:
            assert b[k].shape[0] == n
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    assert shapes == [(5, 3, s, s)] * 3


def test_an_unknown_compile_mode_is_refused_by_name(tmp_path):
    with pytest.raises(TeacherError, match="--compile 'fast'"):
        create_teacher("test_vit", random_init=True).tune(compile_mode="fast")
    proc = run_cli("extract", *TINY, "--dataset-opt", "n=8", "--workers", "0", "--compile", "fast",
                   "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and "--compile 'fast'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_torch_compile_on_the_cpu_gives_the_eager_features():
    plain = create_teacher("test_vit", random_init=True)
    tuned = create_teacher("test_vit", random_init=True)
    tuned.tune(compile_mode="default", batch_size=4)
    x = _images(3, plain.preprocess.input_size)
    torch.testing.assert_close(tuned(x)["features"], plain(x)["features"], atol=1e-4, rtol=1e-4)


def test_attention_kernels_counts_fused_and_unfused_blocks(tmp_path, capsys):
    vit = create_teacher("test_vit", random_init=True)
    blocks = attention_kernels(vit)
    assert blocks["fused"] == len(vit.model.blocks) and blocks["unfused"] == 0
    vit.model.blocks[0].attn.fused_attn = False
    assert attention_kernels(vit) == {"fused": len(vit.model.blocks) - 1, "unfused": 1}
    assert attention_kernels(create_teacher("test_efficientnet", random_init=True)) == {"fused": 0, "unfused": 0}
    mha = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2, batch_first=True))
    assert attention_kernels(mha) == {"fused": 1, "unfused": 0}


def test_extract_warns_when_a_teacher_uses_unfused_attention(tmp_path):
    proc = run_cli("extract", *TINY, "--dataset-opt", "n=8", "--workers", "0", "--out", str(tmp_path / "c"),
                   env_extra={"TIMM_FUSED_ATTN": "0"})
    assert "do not use F.scaled_dot_product_attention" in proc.stderr
    proc = run_cli("extract", *TINY, "--dataset-opt", "n=8", "--workers", "0", "--out", str(tmp_path / "d"))
    assert "scaled_dot_product_attention" not in proc.stderr
