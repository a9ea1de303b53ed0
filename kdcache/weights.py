"""Load user-supplied weight files safely: safetensors, or torch.load(weights_only=True)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

_CONTAINER_KEYS = ("state_dict", "model", "model_state", "module", "ema")


class WeightsError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors file or a (possibly wrapped) state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code objects are refused by weights_only
        raise WeightsError(f"not a plain state dict (loaded with weights_only=True): {e}") from None
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("expected a dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Load by name when names match; else by order when every shape lines up. Returns the mode used."""
    target = model.state_dict()
    if set(state) == set(target):
        bad = [k for k in target if state[k].shape != target[k].shape]
        if bad:
            raise WeightsError(f"shape mismatch for {bad[:3]} (e.g. {tuple(state[bad[0]].shape)} vs "
                               f"{tuple(target[bad[0]].shape)}): wrong architecture for these weights?")
        model.load_state_dict(state, strict=True)
        return "by-name"
    # Some exports rename every key but keep the order (e.g. EfficientNet-Lite ports -> timm).
    src, dst = list(state.items()), list(target.items())
    if len(src) == len(dst) and all(a.shape == b.shape for (_, a), (_, b) in zip(src, dst)):
        model.load_state_dict({k: v for (k, _), (_, v) in zip(dst, src)}, strict=True)
        return "by-order"
    missing = sorted(set(target) - set(state))[:3]
    unexpected = sorted(set(state) - set(target))[:3]
    raise WeightsError(f"keys do not match the architecture ({len(state)} tensors in the file, "
                       f"{len(target)} in the model; missing e.g. {missing}, unexpected e.g. {unexpected})")
