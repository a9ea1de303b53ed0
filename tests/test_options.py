"""An option is declared once: every field of every stage schema has its flag, its --help shows the field's
default, and a value outside the declared range (or the type's own) is refused naming the flag, before any
work starts. The registries give one kind of error for an unknown name."""
from __future__ import annotations

import dataclasses
import re
from unittest import mock

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.options import choices_of, flag_name, meta, shown_default
from kdcache.registry import Registry
from kdcache.schema import STAGES

COMMANDS = typer.main.get_command(app).commands
FIELDS = [(stage, f) for stage, cls in STAGES.items() for f in dataclasses.fields(cls)]


def _kind(f) -> str:
    return str(f.type).replace("| None", "").strip()


@pytest.mark.parametrize("stage,f", FIELDS, ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_field_has_its_flag_and_its_default_in_the_help(stage, f):
    params = {o: p for p in COMMANDS[stage].params for o in [*p.opts, *p.secondary_opts]}
    flag = flag_name(f)
    assert flag in params, f"{stage}: no flag {flag} for the field {f.name}"
    help_text = params[flag].help or ""
    assert meta(f).help and meta(f).help in help_text  # the declared help, as declared
    if not meta(f).required:
        assert help_text.endswith(f"(default: {shown_default(f)})"), (flag, help_text)
        assert "(default " not in help_text  # no hand-written default beside the one from the field
    shown = re.sub(r"[│\s]+", " ", CliRunner().invoke(app, [stage, "--help"], terminal_width=400).output)
    assert flag in shown


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_help_is_shown_whole(command):
    """Nothing of a flag's help is taken for markup (text in square brackets would vanish from --help)."""
    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
    shown = re.sub(r"[│\s]+", " ", shown)
    for param in COMMANDS[command].params:
        text = re.sub(r"\s+", " ", getattr(param, "help", None) or "").strip()
        assert text in shown, (command, param.name, text)


def test_the_shown_defaults_are_the_fields_values():
    cls = STAGES["distill"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert shown_default(fields["lr"]) == "0.001" and shown_default(fields["epochs"]) == "10"
    assert shown_default(fields["progress"]) == "off"  # the flag is --no-progress: off unless given
    assert shown_default(fields["resume"]) == "off" and shown_default(fields["method"]) == "customkd"


def _bounds(f) -> tuple[float | None, float | None]:
    """The accepted range of a numeric field: the declared one within the type's own."""
    m = meta(f)
    if _kind(f) == "int":
        low = m.low if m.low is not None else m.limits[0]
        return low, m.high if m.high is not None else m.limits[1]
    return (0.0 if m.positive else m.low), m.high


def _outside(f) -> st.SearchStrategy:
    """Values outside what the field accepts, as text a shell would pass."""
    kind, m = _kind(f), meta(f)
    low, high = _bounds(f) if kind in ("int", "float") else (None, None)
    if kind == "int":
        return (st.integers(-2**40, int(low) - 1) | st.integers(int(high) + 1, 2**70)).map(str)
    if kind == "float":
        options = [st.sampled_from(["nan", "inf", "-inf"])]
        if low is not None:
            below = st.floats(max_value=low, allow_nan=False, allow_infinity=False, min_value=-1e9)
            options.append(below if m.positive else below.filter(lambda x: x < low))  # -0.0 is not below 0
        if high is not None:
            options.append(st.floats(min_value=high, allow_nan=False, allow_infinity=False, max_value=1e9)
                           .filter(lambda x: x > high))
        return st.one_of(*options).map(str)
    return st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True).filter(lambda w: w not in choices_of(m))


RANGED = [(stage, f) for stage, f in FIELDS if _kind(f) in ("int", "float") or meta(f).choices]
CONTEXT = {"extract": ["--dataset", "synthetic", "--no-progress"], "distill": ["--no-check-dataset", "--no-progress"],
           "evaluate": ["--no-progress"], "demo": ["--no-progress"]}


def test_every_stage_has_ranged_options():
    assert {stage for stage, _ in RANGED} == set(STAGES)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_a_value_out_of_range_is_refused_naming_the_flag(tmp_path, data):
    stage, f = data.draw(st.sampled_from(RANGED), label="field")
    value = data.draw(_outside(f), label="value")
    flag = flag_name(f)
    where = {"extract": ["--out", str(tmp_path / "cache")], "distill": ["--cache", str(tmp_path / "no-cache")],
             "evaluate": ["--run", str(tmp_path / "no-run")], "demo": []}[stage]
    # nothing may start: a refused value never reaches the teacher, the training or the demo
    with mock.patch("kdcache.stages.demo.lite0_weights", side_effect=AssertionError("the demo started")):
        res = CliRunner().invoke(app, [stage, *CONTEXT[stage], *where, f"{flag}={value}"])
    line = " ".join(res.stderr.split())
    assert res.exit_code == 2 and line.startswith("error: ") and flag in line, (stage, flag, value, res.stderr)
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "cache").exists()


def test_the_registry_names_the_choices_and_the_closest():
    reg = Registry("widget", KeyError)
    reg.register("sharp", colour="red")(object)
    reg.add("round", int)
    assert reg.names() == ["round", "sharp"] and reg.get("round") is int and reg.meta("sharp") == {"colour": "red"}
    with pytest.raises(KeyError, match=r"unknown widget 'shrap'; choose one of: round, sharp "
                                        r"\(did you mean 'sharp'\?\)"):
        reg.get("shrap")


def test_the_datasets_without_a_folder_are_declared_once():
    from kdcache.datasets import DATASETS, needs_root

    assert {n for n in DATASETS if not needs_root(n)} == {"synthetic", "mnist5k"}
    assert needs_root("imagefolder") and needs_root("no-such-layout")


def test_method_options_read_the_same_true_and_false_words():
    from kdcache.methods import METHOD_OPTIONS
    from kdcache.options import FALSE_WORDS, TRUE_WORDS

    name, key = next((n, k) for n, opts in METHOD_OPTIONS.items() for k, o in opts.items() if o.kind is bool)
    opt = METHOD_OPTIONS[name][key]
    assert all(opt.parse(name, key, w.upper()) is True for w in TRUE_WORDS)
    assert all(opt.parse(name, key, w) is False for w in FALSE_WORDS)


@pytest.mark.parametrize("flag", ["--compression", "--head"])
def test_a_mistyped_choice_with_overwrite_leaves_the_existing_cache_as_it_was(tmp_path, flag):
    """A choice is checked before the teacher is built and before --overwrite clears anything."""
    from kdcache.stages import extract

    out = tmp_path / "cache"
    extract.run(extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", 16), ("classes", 2)),
                                      teacher="test_efficientnet", random_init=True, teacher_input_size=32,
                                      views=2, shard_size=8, batch_size=8, workers=0, out=str(out), progress=False))
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    res = CliRunner().invoke(app, ["extract", "--dataset", "synthetic", "--teacher", "test_efficientnet", "--random-init",
                                   "--teacher-input-size", "32", "--views", "2", "--shard-size", "8", "--workers", "0",
                                   "--out", str(out), "--overwrite", flag, "zstdd"])
    assert res.exit_code == 2 and f"unknown {flag} 'zstdd'" in " ".join(res.stderr.split()), res.stderr
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
