"""Teachers: names, local weight files, heads, tokens, and the offline error."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from kdcache.datasets import create_dataset
from kdcache.heads import HeadError, fit_probe, resolve_head
from kdcache.teachers import TeacherError, create_teacher, zeroshot_head


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_random_init_is_seeded_and_reproducible():
    a, b = create_teacher("test_vit", random_init=True), create_teacher("test_vit", random_init=True)
    assert _same_weights(a.model, b.model)


def test_unknown_teacher_suggests_names():
    with pytest.raises(TeacherError, match="Did you mean: .*vit_large_patch14_dinov2"):
        create_teacher("vit_large_patch14_dinov")
    with pytest.raises(TeacherError, match="unknown open_clip model"):
        create_teacher("open_clip:ViT-L-15/openai")


def test_offline_without_weights_names_the_flag():
    with pytest.raises(TeacherError, match="--teacher-weights FILE"):
        create_teacher("test_vit")


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "wrapped", "renamed"])
def test_teacher_weights_file(tmp_path, fmt):
    src = create_teacher("test_vit", random_init=True).model
    state = {k: v.clone() + 0.5 for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = state
        if fmt == "wrapped":
            obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
        if fmt == "renamed":  # other names, same order and shapes (as EfficientNet-Lite ports)
            obj = {f"_layer{i}": v for i, v in enumerate(state.values())}
        torch.save(obj, path)
    t = create_teacher("test_vit", weights=str(path))
    assert t.source == "file" and t.weights_tag.startswith("sha256:")
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in state.items())


def test_bad_weight_files_are_refused(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"a": torch.zeros(3)}, str(wrong))
    with pytest.raises(TeacherError, match="--teacher-weights .*keys do not match"):
        create_teacher("test_vit", weights=str(wrong))

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(TeacherError, match="weights_only"):
        create_teacher("test_vit", weights=str(evil))
    with pytest.raises(TeacherError, match="does not exist"):
        create_teacher("test_vit", weights=str(tmp_path / "missing.pth"))


def test_outputs_features_tokens_and_native_logits():
    t = create_teacher("test_vit", random_init=True)
    assert t.preprocess.input_size == 160 and t.preprocess.crop_pct == 0.95
    t.set_head("native")
    x = torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8)
    out = t(x, token_grid=3)
    assert out["features"].shape == (2, 64) and out["tokens"].shape == (2, 9, 64)
    assert out["logits"].shape == (2, 1000)
    norm = (x.float() / 255 - 0.5) / 0.5
    assert torch.allclose(out["features"], t.model.forward_head(t.model.forward_features(norm), pre_logits=True),
                          atol=1e-5)
    cnn = create_teacher("test_efficientnet", random_init=True)
    assert cnn(x, token_grid=2)["tokens"].shape == (2, 4, cnn.dims()["features"])


def test_head_resolution():
    t = create_teacher("test_vit", random_init=True)
    synthetic = create_dataset("synthetic", n=16, classes=4)
    assert resolve_head("auto", t, synthetic) == "probe"
    with pytest.raises(HeadError, match="1000 classes, the dataset 4"):
        resolve_head("native", t, synthetic)
    with pytest.raises(HeadError, match="open_clip"):
        resolve_head("zeroshot", t, synthetic)


def test_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 5, generator=g) * 0.3 + 10  # offset: the probe folds in the mean
    w, b = fit_probe(x.numpy(), y.numpy(), 3)
    assert ((torch.tensor(x.numpy() @ w.T + b)).argmax(1) == y).float().mean() == 1.0


@pytest.fixture
def tiny_clip(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "kdtest-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "kdtest-tiny-clip.json")
    return "open_clip:kdtest-tiny-clip"


def test_open_clip_teacher_and_zeroshot_head(tiny_clip):
    t = create_teacher(tiny_clip, random_init=True)
    assert t.kind == "open_clip" and t.preprocess.input_size == 32
    synthetic = create_dataset("synthetic", n=8, classes=3)
    assert resolve_head("auto", t, synthetic) == "zeroshot"
    t.set_head("zeroshot", zeroshot_head(t, synthetic.classes))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = t(x, token_grid=2)
    assert out["features"].shape == (2, 32)  # pre-projection width
    assert out["tokens"].shape == (2, 4, 32) and out["logits"].shape == (2, 3)
    emb = t.model.encode_image((x.float() / 255 - t.mean / 255) / (t.std / 255))
    expected = t.head.scale * torch.nn.functional.normalize(emb, dim=-1) @ t.head.text.T
    assert torch.allclose(out["logits"], expected, atol=1e-4)
    with pytest.raises(TeacherError, match="pretrained tag"):
        create_teacher("open_clip:kdtest-tiny-clip")
