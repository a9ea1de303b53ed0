"""Stage configs: frozen dataclasses resolved as defaults < YAML file < CLI flags."""
from __future__ import annotations


import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def parse_bool(value: Any, name: str) -> bool:
    """A boolean from a bool, 0/1, or one of the words true/false, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"option {name!r} must be true or false (or yes/no, on/off, 1/0), got {value!r}")


def coerce(name: str, value: Any, annotation: str) -> Any:
    """`value` as the field's declared type (annotations are strings: int, float, bool, str, tuple and
    `X | None`), or a ConfigError naming the option. Strings that spell a number or a boolean are
    converted (YAML reads `1e-3` as a string); anything else of the wrong type is refused."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"option {name!r} needs a value")
    kind = next(k for k in kinds if k != "None")
    if kind == "bool":
        return parse_bool(value, name)
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
    if kind == "float":
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"option {name!r} must be a finite number, got {value!r}")
        return number
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"option {name!r} must be a string, got {value!r}")
        return value
    if kind == "tuple":
        if isinstance(value, dict):  # key: value options (dataset_options, method_options) as a YAML mapping
            return tuple((k, v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(tuple(x) if isinstance(x, list) else x for x in value)
        raise ConfigError(f"option {name!r} must be a list, got {value!r}")
    return value


def nearest(name: str, names) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        unknown = sorted(str(k) for k in set(loaded) - names)
        if unknown:
            raise ConfigError(f"--config {p}: unknown option {unknown[0]!r}{nearest(unknown[0], names)}; known: "
                              f"{', '.join(sorted(names))}")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    typed = {}
    for k, v in values.items():
        try:
            typed[k] = coerce(k, v, types[k])
        except ConfigError as e:
            from_yaml = yaml_path and flags.get(k) is None
            raise ConfigError(f"--config {yaml_path}: {e}" if from_yaml else str(e)) from None
    return cls(**typed)


def to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(cfg, path: str | Path) -> None:
    from kdcache.location import cache_path

    cache_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cache_location(value: str | None, flag: str) -> None:
    """A cache may live on a local path or on any fsspec URL whose filesystem is installed (s3:// needs
    s3fs: `pip install kdcache[s3]`); anything else is refused by name."""
    from kdcache.location import cache_path, is_remote, is_url

    if not value or not is_url(value):
        return
    try:
        path = cache_path(value)  # an unknown protocol fails here
        if is_remote(path):
            path.fs  # a missing filesystem package fails here
    except (ValueError, ImportError) as e:
        raise ValueError(f"{flag} {value}: no filesystem for this URL is installed ({e})") from None
    if not str(value).split("://", 1)[1].strip("/"):
        raise ValueError(f"{flag} {value}: give a bucket and a path, e.g. s3://bucket/caches/name")


def local_path(value: str | None, flag: str) -> None:
    """Runs (and dataset folders) live on a local or shared file system; a URL (s3://, gs://, ...) is refused
    by name instead of becoming a local folder called `s3:`."""
    from kdcache.location import is_url

    if value and is_url(value):
        raise ValueError(f"{flag} {value}: runs and datasets on object storage (URLs) are not supported; give a "
                         "local path or a shared file system mounted as one (caches may be URLs: --out of extract, "
                         "--cache)")
