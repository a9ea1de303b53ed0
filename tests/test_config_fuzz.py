"""Generated hostile input for every command and every stage's config: option values (negative, huge, of
the wrong type), YAML documents (known and unknown keys, any values, keys given twice, garbage bytes).

The invariant: a refused input is a user error (exit code 2, ONE line, naming the flag, or the file and
the key), never a traceback or exit code 1; an accepted input resolves to a typed config. Examples are
few by default; HYPOTHESIS_PROFILE=slow (make test-slow) tries many more.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache import schema
from kdcache.stages.config import ConfigError, flag_of, resolve
from kdcache.stages.distill import check_config

STAGES = [schema.ExtractConfig, schema.DistillConfig, schema.EvaluateConfig, schema.DemoConfig]
FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
_names = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh(scratch: Path, suffix: str = "") -> Path:
    return scratch / f"{next(_names)}{suffix}"


def _kinds(cls) -> dict[str, str]:
    """field -> its kind (int, float, bool, str, Names, Pairs), and whether None is allowed."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["1e-3", "yes", "off", "12", " 7 ", "-1", "nan", "inf", "[", "a: b"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# what a shell can pass: no NUL, no lone surrogate
argv_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16)


def _valid(kind: str, field: str):
    """Values a field accepts (the schema's limits), as YAML or a flag would give them."""
    low, high = schema.INT_LIMITS.get(field, schema.INT_RANGE)
    base = kind.replace("| None", "").strip()
    name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
    return {"int": st.integers(low, high), "float": st.floats(allow_nan=False, allow_infinity=False),
            "bool": st.booleans(), "str": name, "Names": st.lists(name, max_size=3),
            "Pairs": st.dictionaries(name.filter(str.strip), st.integers(-9, 9) | name, max_size=3)}[base]


@st.composite
def valid_documents(draw, cls):
    kinds = _kinds(cls)
    keys = draw(st.lists(st.sampled_from(sorted(kinds)), unique=True, max_size=6))
    return {k: draw(_valid(kinds[k], k)) for k in keys}


@st.composite
def documents(draw, cls):
    """A mapping of known and unknown keys to any values."""
    keys = st.sampled_from(sorted(_kinds(cls))) | st.text(min_size=1, max_size=10)
    return draw(st.dictionaries(keys, values, max_size=5))


def _write(scratch: Path, text: str | bytes) -> Path:
    p = _fresh(scratch, ".yaml")
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def _typed(cfg, cls) -> None:
    """Every field of an accepted config holds its declared kind."""
    for name, kind in _kinds(cls).items():
        value = getattr(cfg, name)
        if value is None:
            assert "None" in kind, name
            continue
        base = kind.replace("| None", "").strip()
        if base == "int":
            low, high = schema.INT_LIMITS.get(name, schema.INT_RANGE)
            assert type(value) is int and low <= value <= high, (name, value)
        elif base == "float":
            assert type(value) is float and math.isfinite(value), (name, value)
        elif base in ("bool", "str"):
            assert type(value).__name__ == base, (name, value)
        elif base == "Names":
            assert isinstance(value, tuple) and all(isinstance(x, str) for x in value), (name, value)
        else:
            assert isinstance(value, tuple) and all(len(p) == 2 and isinstance(p[0], str) for p in value), (name, value)


# ----------------------------------------------------------------------------------- the resolver directly

@FIXTURES
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
@given(doc=st.data())
def test_any_yaml_document_resolves_or_is_one_error_naming_the_file_and_key(scratch, cls, doc):
    data = doc.draw(documents(cls))
    path = _write(scratch, yaml.safe_dump(data, sort_keys=False))
    try:
        cfg = resolve(cls, path)
    except ConfigError as e:
        message = _one_line(str(e))
        assert message.startswith(f"--config {path}: "), message
        assert any(repr(str(k)) in message for k in data), (data, message)
        return
    _typed(cfg, cls)


@FIXTURES
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
@given(doc=st.data())
def test_every_valid_yaml_document_resolves_to_its_values(scratch, cls, doc):
    data = doc.draw(valid_documents(cls))
    try:
        cfg = resolve(cls, _write(scratch, yaml.safe_dump(data, sort_keys=False)))
    except ConfigError as e:  # valid values, one of which has no effect beside the others (options.check_needs)
        assert "has no effect without it" in str(e) and any(f"option {k!r}" in str(e) for k in data), str(e)
        return
    _typed(cfg, cls)
    for key, value in data.items():
        got = getattr(cfg, key)
        want = tuple(value.items()) if isinstance(value, dict) else tuple(value) if isinstance(value, list) else value
        assert got == want, (key, got, want)


@FIXTURES
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
@given(doc=st.data())
def test_a_key_given_twice_is_an_error_naming_the_key_and_the_file(scratch, cls, doc):
    data = doc.draw(valid_documents(cls))
    assume(data)
    twice = doc.draw(st.sampled_from(sorted(data)))
    text = "".join(yaml.safe_dump({k: v}) for k, v in [*data.items(), (twice, data[twice])])
    path = _write(scratch, text)
    with pytest.raises(ConfigError) as e:
        resolve(cls, path)
    message = _one_line(str(e.value))
    assert message.startswith(f"--config {path}: line ") and f"{twice!r} is given twice" in message, message


@FIXTURES
@given(raw=st.binary(max_size=64) | st.text(max_size=40).map(str.encode))
def test_garbage_bytes_are_one_error_naming_the_file(scratch, raw):
    path = _write(scratch, raw)
    try:
        cfg = resolve(schema.DistillConfig, path)
    except ConfigError as e:
        assert _one_line(str(e)).startswith(f"--config {path}"), str(e)
        return
    _typed(cfg, schema.DistillConfig)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_any_flag_value_resolves_or_is_one_error_naming_the_flag(cls, data):
    kinds = _kinds(cls)
    keys = data.draw(st.lists(st.sampled_from(sorted(kinds)), unique=True, min_size=1, max_size=4))
    flags = {k: data.draw(scalars | st.lists(scalars, max_size=2).map(tuple)) for k in keys}
    given_flags = [flag_of(k) for k, v in flags.items() if v is not None]
    try:
        cfg = resolve(cls, None, **flags)
    except ConfigError as e:
        message = _one_line(str(e))
        assert any(message.startswith(f) for f in given_flags), (flags, message)
        return
    _typed(cfg, cls)


# ---------------------------------------------------------------------------------------- the command line

INT_FLAGS = ["--epochs", "--batch-size", "--workers", "--seed", "--shuffle-buffer", "--image-size", "--eval-every",
             "--teacher-adapt", "--labels-per-class"]
FLOAT_FLAGS = ["--lr", "--weight-decay", "--warmup-epochs", "--labelled-ratio"]
numbers = st.integers(-2**70, 2**70) | st.integers(-3, 40) | st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32,
                                                                                2**63 - 1, 2**63, 2**64])
floats = st.floats() | st.sampled_from(["1e999", "-0", "nan", "-inf", "1e-3"])


def _invoke(*args: str):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr


def _user_error(code: int, stderr: str) -> str:
    """The stderr of a refused command: exit code 2 and one line that starts with 'error:'."""
    assert code == 2, (code, stderr)
    line = _one_line(stderr).strip()
    assert line.startswith("error: "), line
    return line


@given(ints=st.dictionaries(st.sampled_from(INT_FLAGS), numbers, max_size=3),
       reals=st.dictionaries(st.sampled_from(FLOAT_FLAGS), floats, max_size=2),
       words=st.dictionaries(st.sampled_from(["--optimizer", "--method-opt", "--student", "--scenario"]), argv_text,
                             max_size=2))
def test_distill_options_are_refused_by_flag_or_reach_the_cache(tmp_path_factory, ints, reals, words):
    missing = tmp_path_factory.getbasetemp() / "no-cache"
    options = {**ints, **reals, **words}
    args = [a for flag, value in options.items() for a in (flag, str(value))]
    line = _user_error(*_invoke("distill", "--cache", missing, "--no-check-dataset", "--no-progress", *args))
    if line.startswith(f"error: no cache at {missing}"):  # accepted: the resolver and the range checks agree
        fields = {f.lstrip("-").replace("-", "_"): v for f, v in {**ints, **reals}.items()}
        check_config(resolve(schema.DistillConfig, None, cache=str(missing), **fields))
    else:
        assert any(flag in line for flag in options), (options, line)


EXTRACT_INTS = ["--views", "--tokens", "--batch-size", "--workers", "--shard-size", "--image-bound",
                "--teacher-input-size", "--view-seed"]


@given(ints=st.dictionaries(st.sampled_from(EXTRACT_INTS), numbers, max_size=3),
       words=st.dictionaries(st.sampled_from(["--part", "--view-policy", "--feature-dtype", "--dataset-opt"]),
                             argv_text | st.sampled_from(["auto", "auto/3", "1/4", "4/4", "light", "int8"]),
                             max_size=2))
def test_extract_options_are_refused_by_flag_or_reach_the_dataset(tmp_path_factory, ints, words):
    missing = tmp_path_factory.getbasetemp() / "no-images"
    options = {**ints, **words}
    args = [a for flag, value in options.items() for a in (flag, str(value))]
    env = {k: None for k in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")}
    res = CliRunner().invoke(app, ["extract", "--dataset", "imagefolder", "--data-root", str(missing),
                                   "--no-progress", *args], env=env)
    line = _user_error(res.exit_code, res.stderr)
    assert any(flag in line for flag in [*options, "--data-root"]), (options, line)


@given(ints=st.dictionaries(st.sampled_from(["--batch-size", "--workers", "--latency-repeats", "--latency-threads",
                                             "--latency-batch"]), numbers, max_size=3),
       device=st.none() | argv_text | st.sampled_from(["cpu", "auto", "cuda:7", "meta", "cpu:99999999999999999999"]))
def test_evaluate_options_are_refused_by_flag_or_reach_the_run(tmp_path_factory, ints, device):
    missing = tmp_path_factory.getbasetemp() / "no-run"
    args = [a for flag, value in ints.items() for a in (flag, str(value))] + (["--device", device] if device else [])
    line = _user_error(*_invoke("evaluate", "--run", missing, "--no-progress", *args))
    assert f"{missing} is not a finished distill run" in line or any(f in line for f in [*ints, "--device"]), line


report_json = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["run", "student", "method", "scenario", "student_metrics", "top1",
                                                "teacher_metrics", "params", "macs", "latency_cpu_b1", "median_ms"]),
                               inner, max_size=9), max_leaves=20)


@FIXTURES
@given(content=report_json.map(lambda r: json.dumps(r).encode()) | st.binary(max_size=40))
def test_report_prints_a_table_or_one_error_naming_the_file(scratch, content):
    run = _fresh(scratch)
    run.mkdir()
    (run / "report.json").write_bytes(content)
    code, stderr = _invoke("report", run)
    if code != 0:
        assert str(run / "report.json") in _user_error(code, stderr), stderr


# ------------------------------------------------------------------------------------------ named cases

GOOD_REPORT = {"run": "r", "student": "s", "method": "kd", "scenario": "ssl", "student_metrics": {"top1": 0.5},
               "teacher_metrics": {"top1": 0.75}, "params": 1000, "macs": 2000, "latency_cpu_b1": {"median_ms": 1.5}}


def test_report_of_a_truncated_report_or_a_missing_folder_is_one_line_exit_2(tmp_path):
    good, cut = tmp_path / "good", tmp_path / "cut"
    for run in (good, cut):
        run.mkdir()
        (run / "report.json").write_text(json.dumps(GOOD_REPORT))
    code, _ = _invoke("report", good)
    assert code == 0
    (cut / "report.json").write_text(json.dumps(GOOD_REPORT)[:40])
    line = _user_error(*_invoke("report", good, cut))
    assert f"{cut / 'report.json'} cannot be read" in line and "evaluate --run" in line
    line = _user_error(*_invoke("report", good, tmp_path / "gone"))
    assert f"run folder {tmp_path / 'gone'} does not exist" in line
    (tmp_path / "pending").mkdir()  # a run not evaluated yet: a hint, not an error
    res = CliRunner().invoke(app, ["report", str(good), str(tmp_path / "pending")])
    assert res.exit_code == 0 and "| s | kd | ssl | 0.5000 |" in res.stdout and "no report in" in res.stderr


@pytest.mark.parametrize("text,words", [
    ("views: 3\n  teacher: [x\n", ["line 2, column 10", "mapping values are not allowed"]),
    ("views: [1, 2\n", ["line 2, column 1", "expected ',' or ']'"]),
    ("views: 3\nviews: 4\n", ["line 2, column 1", "the key 'views' is given twice"]),
    ("dataset_options: [1, 2]\n", ["option 'dataset_options' must be a mapping of key: value"]),
    ("dataset_options: {n: [1]}\n", ["option 'dataset_options': n must be a number, a string or a boolean"]),
    ("domains: {a: 1}\n", ["option 'domains' must be a list of names"]),
    ("view_seed: -1\n", ["option 'view_seed' must be between 0 and 4294967295 (2**32 - 1), got -1"]),
    ("workers: 99999999999999999999\n", ["option 'workers' must be between 0 and 2147483647"]),
    ("out: \"a\\0b\"\n", ["option 'out' holds a NUL"]),
    ("- views\n", ["expected a mapping of option: value"]),
    ("a: b\n---\nc: d\n", ["line 2, column 1", "expected a single document"]),
])
def test_yaml_mistakes_are_one_line_naming_the_file_and_where(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = _user_error(*_invoke("extract", "--config", path))
    assert f"--config {path}: " in line and all(w in line for w in words), line


def test_a_binary_or_missing_config_file_is_named(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)))
    line = _user_error(*_invoke("distill", "--config", path))
    assert line == f"error: --config {path} is not a YAML text file (it is not UTF-8 text)"
    path.write_bytes(b"views: 2\x00\n")
    assert "unacceptable character" in _user_error(*_invoke("extract", "--config", path))
    assert f"--config {tmp_path} does not exist (it is a folder)" in _user_error(*_invoke("extract", "--config",
                                                                                           tmp_path))


@pytest.mark.parametrize("seed,words", [(-1, "--seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
                                        (2**32, "--seed must be between 0 and 4294967295"),
                                        (2**63, "--seed must be between 0 and 4294967295")])
def test_seeds_out_of_range_name_the_flag_and_the_range(tmp_path, seed, words):
    line = _user_error(*_invoke("distill", "--cache", tmp_path / "c", "--seed", seed))
    assert words in line


def test_distill_out_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    line = _user_error(*_invoke("distill", "--cache", tmp_path / "c", "--out", tmp_path / "notes.txt"))
    assert f"--out {tmp_path / 'notes.txt'} is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("env", [{"SLURM_ARRAY_TASK_ID": "three"}, {"SLURM_ARRAY_TASK_ID": "1",
                                                                     "SLURM_ARRAY_TASK_MIN": "x"},
                                 {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4.5"},
                                 {"JOB_COMPLETION_INDEX": ""}])
def test_a_non_numeric_job_array_index_names_the_variable(tmp_path, env):
    res = CliRunner().invoke(app, ["extract", "--dataset", "synthetic", "--part", "auto", "--out", str(tmp_path / "c")],
                             env={"SLURM_ARRAY_TASK_ID": None, "JOB_COMPLETION_INDEX": None, **env})
    line = _user_error(res.exit_code, res.stderr)
    bad = next(k for k, v in env.items() if not v.isdigit())
    assert f"--part: the environment variable {bad}=" in line and "is not an integer" in line
    assert not (tmp_path / "c").exists()


@given(index=argv_text, count=st.none() | argv_text)
def test_part_auto_reads_the_environment_or_names_it(index, count):
    from kdcache.stages.extract import parse_part

    env = {"SLURM_ARRAY_TASK_ID": index} | ({"SLURM_ARRAY_TASK_COUNT": count} if count is not None else {})
    old = {k: os.environ.pop(k, None) for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                 "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX")}
    os.environ.update(env)
    try:
        part, parts = parse_part("auto")
        assert 0 <= part < parts and part == int(index)
    except ValueError as e:
        assert _one_line(str(e)).startswith("--part"), str(e)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in old.items() if v is not None})


def test_every_command_is_inside_the_boundary_and_a_bug_says_so(tmp_path, monkeypatch):
    """An unexpected exception is one line saying it is a bug, exit code 1; --debug shows the traceback."""
    import kdcache.report

    def broken(*_):
        raise KeyError("student_metrics")

    monkeypatch.setattr(kdcache.report, "table", broken)
    code, stderr = _invoke("report", tmp_path)
    assert code == 1 and _one_line(stderr).startswith("error: unexpected KeyError: 'student_metrics'") \
        and "a bug in kdcache" in stderr and "--debug" in stderr
    res = CliRunner().invoke(app, ["--debug", "report", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)
    monkeypatch.undo()
    for args in (["info", "--cache", tmp_path / "none"], ["report", tmp_path / "none"],
                 ["evaluate", "--run", tmp_path / "none"], ["distill", "--epochs", "ten"], ["info"],
                 ["extract", "--no-such-flag"], ["distill", "--dataset-opt", "n"]):
        _user_error(*_invoke(*args))


def test_nan_and_inf_key_value_options_stay_words(tmp_path):
    from kdcache.cli import _parse_options

    assert _parse_options(["t=nan", "n=3", "r=0.5", "x=inf"], "--method-opt") == (("t", "nan"), ("n", 3),
                                                                                  ("r", 0.5), ("x", "inf"))
    assert "given twice" in _user_error(*_invoke("extract", "--dataset-opt", "n=1", "--dataset-opt", "n=2"))


# ---------------------------------------------------------------------------------- files others read

def test_an_unwritable_run_folder_is_named_before_evaluating(tmp_path, monkeypatch):
    import errno
    import tempfile

    from kdcache.files import writable

    run = tmp_path / "run"
    run.mkdir()
    for name, text in [("summary.json", '{"scenario_digest": "x", "num_classes": 2, "image_size": 32}'),
                       ("student.safetensors", ""), ("config.yaml", "cache: somewhere\n")]:
        (run / name).write_text(text)
    assert writable(run) and not writable(run / "summary.json" / "sub")

    def read_only(*_, **__):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # as a read-only mount (root writes through modes)
    line = _user_error(*_invoke("evaluate", "--run", run, "--no-onnx"))
    assert line.startswith(f"error: run folder {run} is not writable") and "copy" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "student.safetensors", "summary.json"]


def test_a_damaged_run_config_or_summary_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.safetensors").write_text("")
    (run / "summary.json").write_text('{"scenario_di')
    assert f"{run / 'summary.json'} cannot be read" in _user_error(*_invoke("evaluate", "--run", run))
    (run / "summary.json").write_text('{"scenario_digest": "x", "num_classes": 2, "image_size": 32}')
    (run / "config.yaml").write_text("cache: c\nepochs: many\n")
    line = _user_error(*_invoke("evaluate", "--run", run))
    assert f"{run / 'config.yaml'} is damaged (option 'epochs' must be an integer" in line and "--resume" in line


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_tensors_and_exports_get_the_umask_mode_not_0600(tmp_path, mask):
    import torch

    from kdcache.files import save_tensors, umask
    from kdcache.measure import export_timm
    from kdcache.students import create_student

    old = os.umask(mask)
    try:
        assert umask() == mask
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        student = create_student("test_efficientnet", 3)
        export_timm(student.model, tmp_path / "export", ["a", "b", "c"], 32, [0.5] * 3, [0.5] * 3, "bilinear")
    finally:
        os.umask(old)
    files = [tmp_path / "w.safetensors", *(tmp_path / "export").iterdir()]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~mask) for f in files}
