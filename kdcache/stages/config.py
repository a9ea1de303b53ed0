"""Stage configs: frozen dataclasses resolved as defaults < YAML file < CLI flags."""
from __future__ import annotations


import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .schema import FLAG_FIELDS, INT_LIMITS, INT_RANGE

T = TypeVar("T")


class ConfigError(ValueError):
    pass


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
SCALARS = (str, int, float)  # what the value of a KEY=VALUE option may be (bool is an int)


def label(name: str) -> str:
    """How an error names an option: a flag (`--seed`) as it is, a YAML key as `option 'seed'`."""
    return name if name.startswith("--") else f"option {name!r}"


def flag_of(field: str) -> str:
    """The command-line flag that sets a schema field (`dataset_options` -> `--dataset-opt`)."""
    flags = {v: k for k, v in FLAG_FIELDS.items()}
    return "--" + flags.get(field, field).replace("_", "-")


def parse_bool(value: Any, name: str) -> bool:
    """A boolean from a bool, 0/1, or one of the words true/false, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"{label(name)} must be true or false (or yes/no, on/off, 1/0), got {value!r}")


def _span(low: int, high: int) -> str:
    power = (high + 1).bit_length() - 1
    return f"between {low} and {high}" + (f" (2**{power} - 1)" if high + 1 == 2 ** power else "")


def _int(name: str, value: Any, limits: tuple[int, int] = INT_RANGE) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{label(name)} must be an integer, got {value!r}")
    low, high = limits
    if not low <= number <= high:
        raise ConfigError(f"{label(name)} must be {_span(low, high)}, got {number}")
    return number


def _float(name: str, value: Any) -> float:
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):  # not a number; an integer beyond any float
            pass
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{label(name)} must be a finite number, got {value!r}")
    return number


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{label(name)} must be a string, got {value!r}")
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):  # no file name can hold them
        raise ConfigError(f"{label(name)} holds a NUL or an unpaired surrogate character: {value!r}")
    return value


def _names(name: str, value: Any) -> tuple:
    """A repeated flag (--domain a --domain b) or a YAML list of names; numbers become names."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{label(name)} must be a list of names, e.g. [a, b], got {value!r}")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, SCALARS):
            raise ConfigError(f"{label(name)} must be a list of names, got the item {x!r}")
        out.append(_str(name, str(x)))
    return tuple(out)


def _pairs(name: str, value: Any) -> tuple:
    """KEY=VALUE flags, or in YAML a mapping {key: value} (or the list of [key, value] pairs a saved config
    holds); keys are names, values scalars, and no key is given twice."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ConfigError(f"{label(name)} must be a mapping of key: value (e.g. {{n: 512}}), got {value!r}")
    seen = set()
    for key, v in pairs:
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{label(name)}: the key {key!r} is not a name (key: value, e.g. {{n: 512}})")
        if not isinstance(v, SCALARS) or isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{label(name)}: {key} must be a number, a string or a boolean, got {v!r}")
        if key in seen:
            raise ConfigError(f"{label(name)}: the key {key!r} is given twice")
        seen.add(key)
        _str(name, key)
    return tuple((k, _str(name, v) if isinstance(v, str) else v) for k, v in pairs)


def _list(name: str, value: Any) -> tuple:
    """A plain `tuple` field: any list (inner lists become tuples)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{label(name)} must be a list, got {value!r}")
    return tuple(tuple(x) if isinstance(x, list) else x for x in value)


KINDS = {"float": _float, "str": _str, "Names": _names, "Pairs": _pairs, "tuple": _list,
         "bool": lambda name, value: parse_bool(value, name)}


def coerce(name: str, value: Any, annotation: str, limits: tuple[int, int] = INT_RANGE) -> Any:
    """`value` as the field's declared type (annotations are strings: int, float, bool, str, Names, Pairs,
    tuple and `X | None`), or a ConfigError naming the option (`name`: a YAML key, or a flag such as --seed).
    Strings that spell a number or a boolean are converted (YAML reads `1e-3` as a string); anything
    else of the wrong type, and integers outside `limits`, are refused."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{label(name)} needs a value")
    kind = next(k for k in kinds if k != "None")
    return _int(name, value, limits) if kind == "int" else KINDS[kind](name, value)


def nearest(name: str, names) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(**{k: coerce(where(k), v, types[k], INT_LIMITS.get(k, INT_RANGE)) for k, v in values.items()})


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
        return _build(cls, values | given, lambda k: flag_of(k) if k in given else k)
    except ConfigError as e:
        from_yaml = yaml_path and not str(e).startswith("--")
        raise ConfigError(f"--config {yaml_path}: {e}" if from_yaml else str(e)) from None


def to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(cfg, path: str | Path) -> None:
    from kdcache.cache.backend import cache_path

    cache_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
        raise ValueError(f"{flag} {value} is a file; give a folder (a new or an existing one)")


def env_int(name: str, flag: str, default=None):
    """An integer from the environment variable `name` (`default` when unset), or a ValueError naming the
    variable and the flag that reads it."""
    import os

    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{flag}: the environment variable {name}={text!r} is not an integer") from None
