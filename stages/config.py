"""Stage configs: frozen dataclasses resolved as defaults < YAML file < CLI flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def resolve(cls: type[T], yaml_path: str | Path | None = None, **flags: Any) -> T:
    """Build `cls` from its defaults, then a YAML file, then flags that were given (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"--config {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {p}: expected a mapping of option: value")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"--config {p}: unknown option(s) {unknown}; known: {sorted(names)}")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return cls(**values)


def to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
