"""Declaring and typing one option: a field's metadata (help, range, choices, flag) and the coercion of a
value from YAML or a flag to the field's type. Torch-free; used by the stage schemas and by method options.
Imports nothing from kdcache but `cache.backend` (where a config is written)."""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# every integer option is a count, a size or an index: none is negative, none needs more than 31 bits;
# a seed may use 32 (what numpy's and torch's seeding both accept)
INT_RANGE = (0, 2**31 - 1)
SEED_RANGE = (0, 2**32 - 1)


class ConfigError(ValueError):
    pass


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
SCALARS = (str, int, float)  # what the value of a KEY=VALUE option may be (bool is an int)


def label(name: str) -> str:
    """How an error names an option: a flag (`--seed`) as it is, a YAML key as `option 'seed'`."""
    return name if name.startswith("--") else f"option {name!r}"


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


def _int(name: str, value: Any, limits: tuple[int, int] = INT_RANGE, declared: Option | None = None) -> int:
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
    if not low <= number <= high:  # the field's own range where it declares one, else the type's
        problem = _bound(declared, label(name), number) if declared is not None else None
        raise ConfigError(problem or f"{label(name)} must be {_span(low, high)}, got {number}")
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


def _pairs(name: str, value: Any, example: str = "n=512") -> tuple:
    """KEY=VALUE flags, or in YAML a mapping {key: value} (or the list of [key, value] pairs a saved config
    holds); keys are names, values scalars, and no key is given twice. `example`: one KEY=VALUE the hints show."""
    key_eg, _, value_eg = example.partition("=")
    mapping = f"{{{key_eg}: {value_eg}}}"
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ConfigError(f"{label(name)} must be a mapping of key: value (e.g. {mapping}), got {value!r}")
    seen = set()
    for key, v in pairs:
        if not isinstance(key, str) or not key.strip():
            if name.startswith("--"):  # a flag: its KEY=VALUE as typed
                raise ConfigError(f"{name} {key}={v}: the key is empty; write KEY=VALUE, e.g. {name} {example}")
            raise ConfigError(f"{label(name)}: the key {key!r} is not a name (key: value, e.g. {mapping})")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{label(name)}: {key} must be a finite number, got {v!r}")
        if not isinstance(v, SCALARS):
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


def coerce(name: str, value: Any, annotation: str, limits: tuple[int, int] = INT_RANGE,
           declared: Option | None = None) -> Any:
    """`value` as the field's declared type (annotations are strings: int, float, bool, str, Names, Pairs,
    tuple and `X | None`), or a ConfigError naming the option (`name`: a YAML key, or a flag such as --seed).
    Strings that spell a number or a boolean are converted (YAML reads `1e-3` as a string); anything
    else of the wrong type, and integers outside `limits`, are refused (the error states the range the field
    `declared`, when it declares one that the value is outside too)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{label(name)} needs a value")
    kind = next(k for k in kinds if k != "None")
    if kind == "Pairs" and declared is not None and declared.example:
        return _pairs(name, value, declared.example)
    return _int(name, value, limits, declared) if kind == "int" else KINDS[kind](name, value)


def to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(cfg, path: str | Path) -> None:
    from kdcache.cache.backend import cache_path

    cache_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def env_int(name: str, flag: str, default=None):
    """An integer from the environment variable `name` (`default` when unset), or a ConfigError naming the
    variable and the flag that reads it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{flag}: the environment variable {name}={text!r} is not an integer") from None


@dataclass(frozen=True)
class Option:
    """What one config field declares besides its type and default.

    `low`/`high`: the accepted range (checked by `check_fields`, the error naming the flag); `positive`: a
    number above 0; `choices`: the accepted words, or "module:name" of a tuple or a function giving them
    (imported when a value is checked); `flag`: the flag when it is not the field name (`--dataset-opt`);
    `negate`: the flag turns a default-on field off (`--no-progress`); `both`: an on and an off flag;
    `required`: the command needs the flag; `limits`: the integer type's own range; `shown`: how --help
    names a default of None; `unit` and `note` complete a range error; `example`: a KEY=VALUE that the
    hints of a pairs option show; `needs`: the conditions (`When`, or a tuple of them: any one) under which the
    option has an effect, checked by `check_needs`."""

    help: str
    low: float | None = None
    high: float | None = None
    positive: bool = False
    choices: tuple | str = ()
    flag: str | None = None
    negate: bool = False
    both: bool = False
    required: bool = False
    limits: tuple[int, int] = INT_RANGE
    shown: str = "none"
    unit: str = ""
    note: str = ""
    example: str = ""
    needs: tuple = ()


def option(default: Any, help: str, **meta: Any):
    """A dataclass field with its `Option` metadata."""
    return field(default=default, metadata={"option": Option(help, **meta)})


def meta(f: dataclasses.Field) -> Option:
    return f.metadata.get("option") or Option("")


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a field: its own (`--dataset-opt`), `--no-<name>` for a negated one, else `--<name>`."""
    m = meta(f)
    return m.flag or "--" + ("no-" if m.negate else "") + f.name.replace("_", "-")


def shown_default(f: dataclasses.Field) -> str:
    """The default as --help shows it: on/off for a switch (of the flag itself when it negates), words for
    lists, `shown` for None."""
    m, value = meta(f), f.default
    if isinstance(value, bool):
        return "on" if value != m.negate else "off"
    if value is None or value == ():
        return m.shown
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def choices_of(m: Option) -> tuple:
    if isinstance(m.choices, str):  # "module:name", imported only when a value is checked
        module, _, name = m.choices.partition(":")
        found = getattr(importlib.import_module(module), name)
        return tuple(found() if callable(found) else found)
    return tuple(m.choices)


def _bound(m: Option, flag: str, value) -> str | None:
    """The range error of one value, or None."""
    if m.positive and not (value > 0 and math.isfinite(value)):
        return f"{flag} must be a positive number, got {value}"
    too_low = m.low is not None and value < m.low
    if too_low or m.high is not None and value > m.high:
        unit = f" {m.unit}" if m.unit else ""
        bound = f"between {m.low:g}{m.note} and {m.high:g}{unit}" if m.high is not None else f">= {m.low:g}"
        return f"{flag} must be {bound}, got {value}"
    return None


def check_fields(cfg) -> None:
    """Every declared range and choice of a config; a ConfigError naming the flag."""
    for f in dataclasses.fields(cfg):
        m, value = meta(f), getattr(cfg, f.name)
        if value is None or isinstance(value, (bool, tuple, list)):
            continue
        flag = flag_name(f)
        if m.choices and value not in choices_of(m):
            raise ConfigError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices_of(m))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = _bound(m, flag, value)
            if problem:
                raise ConfigError(problem)



# ----------------------------------------------------------------------------- options that need another


@dataclass(frozen=True)
class When:
    """A condition on another option `key` under which an option has an effect: its value is one of
    `values`, is none of `excluded` (either a tuple, or "module:name" of a tuple or a function giving them,
    imported only when a given option is checked), or is above `above`."""

    key: str
    values: tuple | str = ()
    excluded: tuple | str = ()
    above: float | None = None

    def holds(self, value: Any) -> bool:
        if self.above is not None:
            return value is not None and value > self.above
        if self.excluded:
            return value not in _names_of(self.excluded)
        return value in _names_of(self.values)

    def describe(self, name: str) -> str:
        """The condition in words, `name` being how the other option is named (--online-teacher, student_weight)."""
        if self.above is not None:
            return f"{name} > {self.above:g}"
        if self.excluded:
            return f"{name} other than {_words(_names_of(self.excluded))}"
        values = _names_of(self.values)
        if values == (True,):
            return name
        return f"{name} {_words(values)}"


def _names_of(values: tuple | str) -> tuple:
    return choices_of(Option("", choices=values)) if isinstance(values, str) else tuple(values)


def _words(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def unmet_need(needs: dict, values: dict, given, name, shown) -> str | None:
    """The first option of `given` whose declared conditions do not hold in `values` (so it would have no
    effect), as one line, or None.

    `needs`: option -> its conditions (each a `When`, or a tuple of them of which any one will do); `name(key)`
    names an option in the message (a flag, or a method option); `shown(key)` names what was given (the flag
    and its value)."""
    for key, conditions in needs.items():
        if key not in given:
            continue
        for condition in conditions:
            anyof = condition if isinstance(condition, tuple) else (condition,)
            if any(c.holds(values.get(c.key)) for c in anyof):
                continue
            want = _words([c.describe(name(c.key)) for c in anyof])
            here = ", ".join(f"{name(c.key)} is {_shown(values.get(c.key))}" for c in anyof)
            return (f"{shown(key)} needs {want} ({here}), and has no effect without it: leave {name(key)} out, "
                    f"or give {want}")
    return None


def needs_of(cls) -> dict:
    """The declared conditions of a stage config's options: field name -> `Option.needs`."""
    return {f.name: meta(f).needs for f in dataclasses.fields(cls) if meta(f).needs}


def differs_from_default(cfg) -> set:
    """The fields of a config whose value is not the default (what a config built in code gave)."""
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}


def check_needs(cfg, given=None, where=None) -> None:
    """Refuse a given option that has no effect in this config (`Option.needs`): a ConfigError naming it and
    what it needs. `given`: the options the user gave (flags, YAML keys); by default those that differ from
    their default. `where(key)`: the YAML file an option came from (None: a flag)."""
    needs = needs_of(type(cfg))
    if not needs:
        return
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    given = differs_from_default(cfg) if given is None else set(given)
    values = {k: getattr(cfg, k) for k in fields}

    def shown(key):
        flag, value = flag_name(fields[key]), values[key]
        path = where(key) if where else None
        if path:
            return f"--config {path}: option {key!r} ({_shown(value)})"
        return flag if isinstance(value, bool) else f"{flag} {_shown(value)}"

    problem = unmet_need(needs, values, given, lambda k: flag_name(fields[k]), shown)
    if problem:
        raise ConfigError(problem)


def command_line(command: str, cls, values: dict, **given) -> str:
    """The `python cli.py <command>` line that gives the config `cls` these field `values` (a recorded config;
    `given` replaces some): each field that differs from its default, as its flag; fields `cls` lacks are left
    out."""
    values = dict(values, **given)
    words = ["python", "cli.py", command]
    for f in dataclasses.fields(cls):
        m, value, flag = meta(f), values.get(f.name, f.default), flag_name(f)
        if value is None or value == f.default or (isinstance(value, (list, tuple)) and tuple(
                tuple(v) if isinstance(v, list) else v for v in value) == f.default):
            continue
        if isinstance(value, bool):
            if m.negate:
                words += [flag] if not value else []
            elif m.both:
                words.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                words.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                words += [flag, f"{item[0]}={item[1]}" if isinstance(item, (list, tuple)) else str(item)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
