"""Teachers by name: timm and open_clip models, or an architecture plus a local weight file.

A Teacher takes uint8 images at its own input size and returns pooled features, optional patch
tokens pooled to a GxG grid, and logits from its head. Its preprocessing comes from the model's
own config and is recorded in the cache.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Registry
from .weights import WeightsError, file_sha256, load_state_dict_file, load_weights_into

OPEN_CLIP_PREFIX = "open_clip:"
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
RANDOM_TAG = "random-init:seed0"
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


class TeacherError(ValueError):
    """A teacher cannot be built as asked; the message names the flag to fix."""


@dataclass(frozen=True)
class Preprocess:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str

    def as_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _seeded(build):
    """Random init is seeded, so a resumed or multi-rank extraction sees the same teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _offline_error(name: str, err: Exception) -> TeacherError:
    return TeacherError(
        f"could not load pretrained weights for teacher {name!r} ({type(err).__name__}: {err}). "
        "Without a model hub, pass --teacher-weights FILE (safetensors or a state dict); "
        "tests and benchmarks may use --random-init."
    )


class Teacher(nn.Module):
    """Wraps a backbone; forward(uint8 images) -> {"features", "logits"?, "tokens"?}."""

    def __init__(self, name: str, source: str, model: nn.Module, preprocess: Preprocess, weights_tag: str,
                 kind: str):
        super().__init__()
        self.name, self.source, self.model, self.preprocess = name, source, model, preprocess
        self.weights_tag, self.kind = weights_tag, kind
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.head: nn.Module | None = None
        self.head_kind = "none"
        self.feature_point = "pre_logits"
        self.channels_last = False
        self.static_batch = 0  # compiled: every batch is padded to this size (one graph, no recompiles)
        self._compiled = None

    # subclasses implement _forward(x) -> (features, token map [B,D,g,g] or None,
    # native logits or None, the input of a zero-shot head)

    def set_head(self, kind: str, head: nn.Module | None = None) -> None:
        self.head_kind, self.head = kind, head

    def tune(self, channels_last: bool = False, compile_mode: str = "off", batch_size: int = 0) -> None:
        """Speed settings for the teacher pass: channels-last memory format (convolutions; a ViT's patch
        embedding), and torch.compile (`compile_mode` one of COMPILE_MODES; `reduce-overhead` captures CUDA
        graphs). A compiled teacher pads every batch to `batch_size`, so one graph serves every batch."""
        if compile_mode not in COMPILE_MODES:
            raise TeacherError(f"unknown --compile {compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile_mode != "off":
            self._compiled = torch.compile(self._forward, mode=None if compile_mode == "default" else compile_mode,
                                      dynamic=False)
            self.static_batch = int(batch_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, token_grid: int = 0) -> dict[str, torch.Tensor]:
        x = (images.float() - self.mean) / self.std
        n = x.shape[0]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if 0 < n < self.static_batch:
            x = torch.cat([x, x.new_zeros((self.static_batch - n, *x.shape[1:]))])
        run = self._forward if self._compiled is None else self._compiled
        features, token_map, native, embedding = run(x, want_tokens=token_grid > 0)
        if x.shape[0] != n:
            features, embedding = features[:n], embedding[:n]
            token_map = token_map[:n] if token_map is not None else None
            native = native[:n] if native is not None else None
        out = {"features": features.float()}
        if token_grid > 0:
            if token_map is None:
                raise TeacherError(f"teacher {self.name} does not expose patch tokens; drop --tokens")
            pooled = F.adaptive_avg_pool2d(token_map.float(), token_grid)  # B, D, G, G
            out["tokens"] = pooled.flatten(2).transpose(1, 2)  # B, G*G, D
        if self.head_kind == "native":
            out["logits"] = native.float()
        elif self.head_kind in ("zeroshot", "probe") and self.head is not None:
            out["logits"] = self.head(out["features"] if self.head_kind == "probe" else embedding.float()).float()
        return out

    def dims(self, token_grid: int = 0) -> dict[str, int]:
        """Output sizes, measured with one tiny forward pass."""
        s = self.preprocess.input_size
        dev = self.mean.device
        out = self(torch.zeros(1, 3, s, s, dtype=torch.uint8, device=dev), token_grid=token_grid)
        return {"features": out["features"].shape[-1],
                "logits": out["logits"].shape[-1] if "logits" in out else 0,
                "tokens": out["tokens"].shape[-1] if "tokens" in out else 0}


def attention_kernels(model: nn.Module) -> dict[str, int]:
    """Attention blocks by kernel: `fused` (timm's fused_attn, or nn.MultiheadAttention called without weights,
    as open_clip calls it: both run F.scaled_dot_product_attention, i.e. flash or memory-efficient kernels on a
    GPU) and `unfused` (a matmul-softmax-matmul in Python; timm falls back to it when TIMM_FUSED_ATTN=0)."""
    out = {"fused": 0, "unfused": 0}
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            out["fused" if m.fused_attn else "unfused"] += 1
        elif isinstance(m, nn.MultiheadAttention):
            out["fused"] += 1
    return out


class TimmTeacher(Teacher):
    def _forward(self, x, want_tokens):
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        native = self.model.forward_head(feats) if getattr(self.model, "num_classes", 0) else None
        token_map = None
        if want_tokens:
            if feats.ndim == 3:  # ViT-style: B, T, D with prefix tokens first
                patches = feats[:, getattr(self.model, "num_prefix_tokens", 1):]
                n = patches.shape[1]
                g = int(round(n ** 0.5))
                if g * g != n:
                    raise TeacherError(f"teacher {self.name}: {n} patch tokens are not a square grid")
                token_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, g, g)
            elif feats.ndim == 4:
                token_map = feats if feats.shape[1] == pooled.shape[-1] else None
        return pooled, token_map, native, pooled


class OpenClipTeacher(Teacher):
    def _forward(self, x, want_tokens):
        visual = self.model.visual
        proj = getattr(visual, "proj", None)
        if hasattr(visual, "output_tokens") and proj is not None:
            visual.proj, visual.output_tokens = None, True
            try:
                pooled, tokens = visual(x)
            finally:
                visual.proj, visual.output_tokens = proj, False
            embedding = pooled @ proj
        else:  # non-ViT towers: only the projected embedding is exposed
            embedding = visual(x)
            pooled, tokens = embedding, None
        features = embedding if self.feature_point == "embedding" else pooled
        token_map = None
        if want_tokens and tokens is not None:
            n = tokens.shape[1]
            g = int(round(n ** 0.5))
            token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)
        return features, token_map, None, embedding


class ZeroShotHead(nn.Module):
    """CLIP zero-shot classifier: cosine to class-name text embeddings, scaled by the logit scale."""

    def __init__(self, text_embeddings: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        self.scale = scale

    def forward(self, embedding):
        return self.scale * F.normalize(embedding, dim=-1) @ self.text.T


class LinearHead(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, features):
        return features @ self.weight.T + self.bias


def _timm_preprocess(model) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return Preprocess(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                      float(cfg.get("crop_pct", 0.875)), str(cfg.get("interpolation", "bicubic")))


def _create_timm(name: str, weights: str | None, random_init: bool, input_size: int | None = None) -> Teacher:
    import timm

    def build(pretrained: bool, **kw):
        if input_size:
            try:  # ViTs resize their position embeddings to the new grid
                return timm.create_model(name, pretrained=pretrained, img_size=input_size, **kw)
            except TypeError:
                pass
        return timm.create_model(name, pretrained=pretrained, **kw)

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise TeacherError(f"unknown teacher {name!r} (not a timm model; open_clip names start with "
                           f"'{OPEN_CLIP_PREFIX}').{_suggest(base, timm.list_models())}")
    if weights:
        try:
            state = load_state_dict_file(weights)
            # a classifier trained on other classes sets the teacher's class count
            clf = timm.models.get_pretrained_cfg(base)
            key = f"{clf.classifier if clf and isinstance(clf.classifier, str) else 'head'}.weight"
            kw = {"num_classes": state[key].shape[0]} if key in state and state[key].ndim == 2 else {}
            model = build(False, **kw)
            load_weights_into(model, state)
        except WeightsError as e:
            raise TeacherError(f"--teacher-weights {weights}: {e}") from None
        tag, source = "sha256:" + file_sha256(weights), "file"
    elif random_init:
        model, tag, source = _seeded(lambda: build(False)), RANDOM_TAG, "timm"
    else:
        try:
            model = build(True)
        except Exception as e:  # hub unreachable, missing cache, no pretrained tag ...
            raise _offline_error(name, e) from None
        tag, source = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("tag") or name, "timm"
    pre = _timm_preprocess(model)
    if input_size:
        pre = dataclasses.replace(pre, input_size=int(input_size))
    return TimmTeacher(name, source, model.eval(), pre, tag, "timm")


def _create_open_clip(name: str, weights: str | None, random_init: bool) -> Teacher:
    import open_clip

    spec = name[len(OPEN_CLIP_PREFIX):]
    arch, _, pretrained = spec.partition("/")
    if arch not in open_clip.list_models():
        raise TeacherError(f"unknown open_clip model {arch!r}.{_suggest(arch, open_clip.list_models())}")
    if weights or random_init:
        model = _seeded(lambda: open_clip.create_model(arch, pretrained=None))
        if weights:
            try:
                load_weights_into(model, load_state_dict_file(weights))
            except WeightsError as e:
                raise TeacherError(f"--teacher-weights {weights}: {e}") from None
            tag, source = "sha256:" + file_sha256(weights), "file"
        else:
            tag, source = RANDOM_TAG, "open_clip"
    else:
        if not pretrained:
            raise TeacherError(f"open_clip teacher {name!r} needs a pretrained tag, e.g. "
                               f"'{OPEN_CLIP_PREFIX}{arch}/openai' (see open_clip.list_pretrained())")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained)
        except Exception as e:
            raise _offline_error(name, e) from None
        tag, source = pretrained, "open_clip"
    visual = model.visual
    pcfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[-1]
    mean = tuple(pcfg.get("mean", getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pcfg.get("std", getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    # open_clip evaluates with a plain resize to the input size and a full centre crop
    pre = Preprocess(int(size), mean, std, 1.0, str(pcfg.get("interpolation", "bicubic")))
    teacher = OpenClipTeacher(name, source, model.eval(), pre, tag, "open_clip")
    teacher.arch = arch
    return teacher


def create_teacher(name: str, weights: str | None = None, random_init: bool = False,
                   feature: str = "auto", input_size: int | None = None) -> Teacher:
    """Create a teacher by timm name or `open_clip:ARCH/TAG`, optionally from a local weight file.

    `input_size` overrides the model's own input size (e.g. DINOv2 at 448 px); it is recorded.
    """
    if weights and not Path(weights).is_file():
        raise TeacherError(f"--teacher-weights {weights} does not exist")
    teacher = TEACHERS.get(teacher_source(name))(name, weights, random_init, feature, input_size)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _open_clip_source(name: str, weights, random_init: bool, feature: str, input_size) -> Teacher:
    if input_size:
        raise TeacherError("--teacher-input-size applies to timm teachers only")
    teacher = _create_open_clip(name, weights, random_init)
    teacher.feature_point = "embedding" if feature == "embedding" else "pre_projection"
    return teacher


def _timm_source(name: str, weights, random_init: bool, feature: str, input_size) -> Teacher:
    if feature not in ("auto", "pre_logits"):
        raise TeacherError(f"--feature {feature} applies to open_clip teachers only")
    return _create_timm(name, weights, random_init, input_size)


# where a teacher comes from, chosen by the prefix of its name (timm: no prefix)
TEACHERS = Registry("teacher source", TeacherError)
TEACHERS.add("open_clip", _open_clip_source, prefix=OPEN_CLIP_PREFIX)
TEACHERS.add("timm", _timm_source, prefix="")


def teacher_source(name: str) -> str:
    """The registered source whose prefix the name carries (the longest), e.g. `open_clip:ViT-B-32/openai`."""
    return max((s for s in TEACHERS if name.startswith(TEACHERS.meta(s)["prefix"])),
               key=lambda s: len(TEACHERS.meta(s)["prefix"]))


@torch.no_grad()
def zeroshot_head(teacher: Teacher, class_names: list[str]) -> ZeroShotHead:
    """Text embeddings of the class names (averaged over a few prompt templates)."""
    if teacher.kind != "open_clip":
        raise TeacherError("--head zeroshot needs an open_clip teacher (it embeds the class names as text)")
    import open_clip

    tokenizer = open_clip.get_tokenizer(teacher.arch)
    model = teacher.model
    device = next(model.parameters()).device
    rows = []
    for c in class_names:
        text = tokenizer([t.format(c.replace("_", " ")) for t in ZEROSHOT_TEMPLATES]).to(device)
        emb = F.normalize(model.encode_text(text).float(), dim=-1).mean(0)
        rows.append(emb)
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return ZeroShotHead(torch.stack(rows), scale)
