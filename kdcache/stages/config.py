"""Stage configs: frozen dataclasses resolved as defaults < YAML file < CLI flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdcache.options import (  # noqa: F401  (the typing of one value lives there)
    FALSE_WORDS,
    TRUE_WORDS,
    ConfigError,
    check_needs,
    coerce,
    differs_from_default,
    env_int,
    label,
    meta,
    parse_bool,
    to_dict,
    write_yaml,
)
from kdcache.registry import did_you_mean

from kdcache.schema import FLAG_FIELDS

T = TypeVar("T")


def flag_of(field: str) -> str:
    """The command-line flag that sets a schema field (`dataset_options` -> `--dataset-opt`)."""
    flags = {v: k for k, v in FLAG_FIELDS.items()}
    return "--" + flags.get(field, field).replace("_", "-")


def nearest(name: str, names) -> str:
    return did_you_mean(name, names)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: the base class names it
                break
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line and column, 1-based) and what."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):
        return f"position {e.position}: unacceptable character {chr(e.character)!r} (a binary file?)"
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{what}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path, names) -> dict:
    """The option: value mapping of a YAML file whose keys are all in `names`; ConfigError naming the file
    (and the line, column, or key) otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a YAML text file (it is not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{p} cannot be read ({e.strerror})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(loaded).__name__}")
    unknown = sorted(str(k) for k in loaded if k not in names)
    if unknown:
        raise ConfigError(f"{p}: unknown option {unknown[0]!r}{nearest(unknown[0], names)}; known: "
                          f"{', '.join(sorted(names))}")
    return loaded


def _build(cls: type[T], values: dict[str, Any], where) -> T:
    """`cls` from its defaults and `values`; `where(key)` names a value's origin (a flag, or file: key)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: coerce(where(k), v, str(fields[k].type), meta(fields[k]).limits, meta(fields[k]))
                  for k, v in values.items()})


def read_config(cls: type[T], path: str | Path) -> T:
    """A config saved as YAML (a run's config.yaml): ConfigError naming the file and the key otherwise."""
    values = read_yaml(path, {f.name for f in dataclasses.fields(cls)})
    try:
        return _build(cls, values, lambda k: k)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve(cls: type[T], yaml_path: str | Path | None = None, **flags: Any) -> T:
    """Build `cls` from its defaults, then a YAML file, then flags that were given (not None). An error
    names the flag, or the file and the key."""
    values: dict[str, Any] = {}
    if yaml_path:
        try:
            values = read_yaml(yaml_path, {f.name for f in dataclasses.fields(cls)})
        except ConfigError as e:
            raise ConfigError(f"--config {e}") from None
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = _build(cls, values | given, lambda k: flag_of(k) if k in given else k)
    except ConfigError as e:
        from_yaml = yaml_path and not str(e).startswith("--")
        raise ConfigError(f"--config {yaml_path}: {e}" if from_yaml else str(e)) from None
    # an option given that has no effect here is refused; a YAML key counts when it sets another value than the
    # default, so that a run's own config.yaml (which lists every option) still serves as --config
    changed = {k for k in values if k not in given} & differs_from_default(cfg)
    check_needs(cfg, set(given) | changed, lambda k: None if k in given else yaml_path)
    return cfg


def cache_location(value: str | None, flag: str) -> None:
    """A cache may live on a local path or on any fsspec URL whose filesystem is installed (s3:// needs
    s3fs: `pip install kdcache[s3]`); anything else is refused by name."""
    from kdcache.cache.backend import check_url

    if not check_url(value, flag):
        _not_a_file(value, flag)


def local_path(value: str | None, flag: str) -> None:
    """Runs (and dataset folders) live on a local or shared file system; a URL (s3://, gs://, ...) is refused
    by name instead of becoming a local folder called `s3:`."""
    from kdcache.cache.backend import refuse_url

    refuse_url(value, f"{flag} {value}: runs and datasets on object storage (URLs) are not supported; give a "
               "local path or a shared file system mounted as one (caches may be URLs: --out of extract, --cache)")
    _not_a_file(value, flag)


def _not_a_file(value: str | None, flag: str) -> None:
    """A folder option (a cache, a run, a dataset root) that names an existing file is refused by name."""
    if value and Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"{flag} {value} is a file; give a folder (a new or an existing one)")
