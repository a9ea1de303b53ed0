"""No option is silently ignored: an option that has no effect in the given combination (its declared `needs`,
on distill's schema and on each method's options) is refused in one line naming it, exit code 2, before any work
starts; where it has an effect it is accepted. A value equal to the default counts when it was given."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.methods import METHOD_OPTIONS, MethodError, list_methods, methods_without_logits, parse_method_options
from kdcache.methods import labelled_only_methods
from kdcache.options import ConfigError, When, _names_of, choices_of, flag_name, meta, needs_of, to_dict, write_yaml
from kdcache.scenarios import SCENARIOS
from kdcache.stages.config import resolve
from kdcache.schema import DistillConfig

FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
DISTILL_NEEDS = needs_of(DistillConfig)
METHOD_NEEDS = [(method, key) for method, spec in METHOD_OPTIONS.items() for key, o in spec.items() if o.needs]
# the values each option a condition reads may take (schema fields without declared choices)
DOMAINS = {"scenario": SCENARIOS, "method": tuple(list_methods()), "online_teacher": (True, False),
           "from_run": (None, "runs/first")}


def _field_value(name: str) -> st.SearchStrategy:
    """A valid value of a distill option (the one under test)."""
    f, m = FIELDS[name], meta(FIELDS[name])
    kind = str(f.type).replace("| None", "").strip()
    if m.choices:
        return st.sampled_from(choices_of(m))
    if kind == "bool":
        return st.just(True)
    if kind == "Names":
        return st.lists(st.sampled_from(["domain0", "domain1", "clipart"]), min_size=1, max_size=2).map(tuple)
    if kind == "int":
        return st.integers(int(m.low or 0), 50)
    if kind == "float":
        return st.floats(m.low or 0, m.high if m.high is not None else 10, allow_nan=False).map(lambda x: round(x, 3))
    return st.sampled_from(["teacher.safetensors", "/no/such/weights.pt"])


def _condition_value(c: When, holds: bool, domain) -> st.SearchStrategy:
    """A value of the option `c` reads, for which `c` holds (or not)."""
    if c.above is not None:
        return st.floats(c.above, c.above + 1, exclude_min=True).map(lambda x: round(x, 3) or 0.5) if holds \
            else st.just(c.above)
    if c.excluded:
        inside = [v for v in domain if v not in _names_of(c.excluded)]
    else:
        inside = [v for v in domain if v in _names_of(c.values)]
    outside = [v for v in domain if v not in inside]
    return st.sampled_from(inside if holds else outside)


def _conditions(data, needs: tuple, holds: bool, domain_of) -> dict:
    """Values of the options `needs` reads, such that every condition holds, or (not `holds`) one does not."""
    failing = data.draw(st.integers(0, len(needs) - 1), label="failing") if not holds else -1
    values = {}
    for i, condition in enumerate(needs):
        anyof = condition if isinstance(condition, tuple) else (condition,)
        if i == failing:  # none of the alternatives
            picks = [False] * len(anyof)
        else:  # at least one, the others as they come
            picks = data.draw(st.lists(st.booleans(), min_size=len(anyof), max_size=len(anyof)), label="picks")
            picks[data.draw(st.integers(0, len(anyof) - 1), label="one")] = True
        for c, pick in zip(anyof, picks):
            if c.key in values:
                continue
            values[c.key] = data.draw(_condition_value(c, pick, domain_of(c.key)), label=c.key)
    return values


def _argv(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        flag = flag_name(FIELDS[name])
        if value is None:  # the option left out
            continue
        if isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, tuple):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _cli(tmp_path, argv):
    return CliRunner().invoke(app, ["distill", "--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "run"),
                                    *argv])


def _line(res) -> str:
    return " ".join(res.stderr.split())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_a_distill_option_that_would_be_ignored_is_refused_and_one_that_acts_is_accepted(tmp_path, data):
    name = data.draw(st.sampled_from(sorted(DISTILL_NEEDS)), label="option")
    holds = data.draw(st.booleans(), label="has an effect")
    values = _conditions(data, DISTILL_NEEDS[name], holds, DOMAINS.get)
    values[name] = data.draw(_field_value(name), label="value")
    flag = flag_name(FIELDS[name])
    res = _cli(tmp_path, _argv(values))
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stderr  # a missing cache at the latest
    line = _line(res)
    if holds:
        assert "has no effect" not in line, (values, line)
    else:
        assert line.startswith(f"error: {flag}") and "has no effect without it" in line, (values, line)
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # the same in a YAML file (where a value other than the default is what was given)
    changed = {k: v for k, v in values.items() if v != FIELDS[k].default}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in changed.items()}))
    if holds or name not in changed:
        assert resolve(DistillConfig, tmp_path / "c.yaml")
    else:
        with pytest.raises(ConfigError, match=f"c.yaml: option '{name}' .* needs "):
            resolve(DistillConfig, tmp_path / "c.yaml")


def _opt_value(o) -> st.SearchStrategy:
    if o.kind is bool:
        return st.booleans()
    if o.kind is str:
        return st.sampled_from(o.choices)
    if o.kind is int:
        return st.integers(int(o.low or 0) + o.low_open, 50)
    high = o.high if o.high is not None else 10.0
    return st.floats(o.low or 0.0, high, exclude_min=o.low_open, allow_nan=False).map(
        lambda x: round(x, 3) if round(x, 3) > (o.low or 0) or not o.low_open else x)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_a_method_option_that_would_be_ignored_is_refused_and_one_that_acts_is_accepted(tmp_path, data):
    method, key = data.draw(st.sampled_from(METHOD_NEEDS), label="option")
    spec = METHOD_OPTIONS[method]
    holds = data.draw(st.booleans(), label="has an effect")
    options = _conditions(data, spec[key].needs, holds, lambda k: ())
    options[key] = data.draw(_opt_value(spec[key]), label="value")
    if holds:
        assert parse_method_options(method, options)[key] == spec[key].parse(method, key, options[key])
    else:
        with pytest.raises(MethodError, match=f"^--method-opt {key}=.* needs "):
            parse_method_options(method, options)
    argv = ["--method", method, "--scenario", "ssl", "--labels-per-class", "2"]
    for k, v in options.items():
        argv += ["--method-opt", f"{k}={v}"]
    res = _cli(tmp_path, argv)
    line = _line(res)
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stderr
    assert ("has no effect" in line) != holds and (holds or line.startswith(f"error: --method-opt {key}=")), line
    assert not (tmp_path / "run").exists()


def test_the_teacher_weights_without_the_online_teacher_are_refused_before_anything_is_written(tmp_path):
    res = _cli(tmp_path, ["--teacher-weights", str(tmp_path / "bogus.pt")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert _line(res).startswith(f"error: --teacher-weights {tmp_path / 'bogus.pt'} needs --online-teacher")
    assert not (tmp_path / "run").exists()
    # with --online-teacher it is read (and a missing cache is what stops this one)
    res = _cli(tmp_path, ["--teacher-weights", str(tmp_path / "bogus.pt"), "--online-teacher"])
    assert res.exit_code == 2 and "has no effect" not in res.stderr and "no cache at" in res.stderr


def test_a_value_equal_to_the_default_counts_when_it_was_given(tmp_path):
    res = _cli(tmp_path, ["--online-views", "cached"])
    assert res.exit_code == 2 and "--online-views cached needs --online-teacher" in _line(res)
    res = _cli(tmp_path, ["--method", "customkd", "--method-opt", "student_weight=0", "--method-opt", "anchor=true"])
    assert res.exit_code == 2 and "--method-opt anchor=true (method customkd) needs student_weight > 0" in _line(res)
    # a library caller's config: what differs from the default is what was given
    assert DistillConfig(online_views="cached").online_views == "cached"
    from kdcache.stages.distill import check_config

    check_config(DistillConfig(cache=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="--online-views fresh needs --online-teacher"):
        check_config(DistillConfig(cache=str(tmp_path / "c"), online_views="fresh"))


@pytest.mark.parametrize("method", ["supervised", "customkd"])
def test_a_runs_own_config_yaml_still_serves_as_config(tmp_path, method):
    """config.yaml lists every option, those that have no effect at their defaults included."""
    cfg = DistillConfig(method=method, scenario="ssl", labels_per_class=2, epochs=3)
    write_yaml(cfg, tmp_path / "config.yaml")
    assert resolve(DistillConfig, tmp_path / "config.yaml") == cfg
    assert set(to_dict(cfg)) == set(yaml.safe_load((tmp_path / "config.yaml").read_text()))


def test_customkd_options_of_the_moving_customisation_are_refused_on_the_teacher_only_chain():
    for key, value in (("anchor", False), ("refit_threshold", 0.9), ("move_from", 0.5), ("refit_iters", 5),
                       ("record", "train"), ("memory_momentum", 0.9)):
        with pytest.raises(MethodError, match=f"--method-opt {key}={value} .*needs student_weight > 0"):
            parse_method_options("customkd", {"student_weight": 0, key: value})
        parse_method_options("customkd", {"student_weight": 0.5, key: value})
    # the record is also read by the self-training term and a bootstrapped target
    assert parse_method_options("customkd", {"student_weight": 0, "w_self": 1, "record": "train"})["record"] == "train"
    assert parse_method_options("customkd", {"student_weight": 0, "bootstrap": 0.5, "memory_momentum": 0.1})


def test_the_method_lists_the_conditions_read_are_the_registry_s():
    assert set(methods_without_logits()) == {"supervised", "fitnet", "kdep"}
    assert labelled_only_methods() == ["supervised"]
    # every condition names an option of its own table
    for method, key in METHOD_NEEDS:
        for condition in METHOD_OPTIONS[method][key].needs:
            assert all(c.key in METHOD_OPTIONS[method] for c in (condition if isinstance(condition, tuple)
                                                                  else (condition,)))
    for conditions in DISTILL_NEEDS.values():
        assert all(c.key in FIELDS for c in conditions)
