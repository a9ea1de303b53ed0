"""The `kdcache` command line: flags -> a stage config -> kdcache.stages.X.run(cfg)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import os
import re
import shlex
import sys
import traceback
from typing import List, Optional

import typer
from typer.core import TyperGroup

from kdcache.options import flag_name, meta, shown_default
from kdcache.schema import STAGES

# click's exceptions, from the click that this typer uses (its own copy in newer versions)
ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
NoArgsIsHelp = getattr(sys.modules[ClickError.__module__], "NoArgsIsHelpError", ())
CLICK_SIGNALS = (typer.Exit, typer.Abort, ClickError)  # what click itself turns into an exit code

DEBUG = {"on": False}  # set by each invocation: --debug or KDCACHE_DEBUG=1
# errors of the user's files or of the machine, not of kdcache: one line naming the file, like any user error
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
USER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}
# an error that torch's DataLoader raises again in the main process (torch._utils.ExceptionWrapper.reraise)
WORKER_ERROR = re.compile(r"Caught (?P<name>\w+) in [^\n]*\.\nOriginal (?P<trace>.*)", re.S)


class _Commands(TyperGroup):
    """Every command runs inside one error boundary (`_errors`), and a bad flag or value that click finds
    (`--epochs ten`, an unknown option) is one line too, exit code 2."""

    def invoke(self, ctx):
        with _errors():
            return super().invoke(ctx)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelp as e:
            e.show()
            sys.exit(e.exit_code)
        except ClickError as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.secho(f"error: {_one_line(e.format_message())}{hint}", fg=typer.colors.RED, err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a vision teacher once into a Zarr cache, then distil edge students from it.")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an error "
                                    "(also: KDCACHE_DEBUG=1).")):
    DEBUG["on"] = debug or os.environ.get("KDCACHE_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip()


def _message(err: Exception) -> str:
    """The error as one line; a file system error names its file first."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}" + (f" ({err.filename2})" if err.filename2 else "")
    else:
        text = str(err)
    return _one_line(text) or type(err).__name__


def _fail(err: Exception, text: str | None = None) -> None:
    if DEBUG["on"]:
        traceback.print_exception(err)
    typer.secho(f"error: {text or _message(err)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _from_worker(err: Exception) -> tuple[Exception, str, str]:
    """(the error to classify, its type's name, its message in one line). torch's DataLoader raises a worker's
    error again in the main process as the same type (RuntimeError where that type cannot be made from one
    string) whose message is "Caught X in DataLoader worker process N.", then the worker's whole traceback; the
    message is the last exception of that traceback, without its type's name, and an OSError gets its errno
    back from it (so a full disk in a worker reads as one in the main process)."""
    wrapped = WORKER_ERROR.match(str(err))
    if wrapped is None:
        return err, type(err).__name__, _message(err)
    name, trace = wrapped["name"], wrapped["trace"].splitlines()
    last = max((i for i, line in enumerate(trace) if line == "Traceback (most recent call last):"), default=-1)
    start = next((i for i in range(last + 1, len(trace)) if trace[i] and not trace[i][0].isspace()), len(trace))
    head, _, rest = (trace[start] if start < len(trace) else "").partition(": ")
    if head.rpartition(".")[2] != name:  # not the form that traceback writes: keep what torch said
        return err, name, _message(err)
    text = _one_line("\n".join([rest, *trace[start + 1:]])) or name
    original = err
    if type(err).__name__ == name:  # the worker's own type: classified as the main process would
        with contextlib.suppress(Exception):
            original = type(err)(text)
        code = re.match(r"\[Errno (\d+)\] ", text)
        if isinstance(original, OSError) and code:
            original.errno = int(code[1])
    return original, name, text


@contextlib.contextmanager
def _errors():
    """A user error is one line and exit code 2; an unexpected one is one line that says it is a bug, and
    exit code 1 (the traceback with --debug); Ctrl-C keeps finished work and says how to resume."""
    try:
        yield
    except CLICK_SIGNALS:
        raise
    except KeyboardInterrupt:
        typer.secho("interrupted: finished work is kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last resort: no traceback unless asked for
        original, name, text = _from_worker(e)
        if _is_user_error(original):
            _fail(e, text)
        if DEBUG["on"]:
            raise
        typer.secho(f"error: unexpected {name}: {text} (a bug in kdcache: rerun with --debug for "
                    "the traceback and report it)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _is_user_error(err: Exception) -> bool:
    from kdcache.datasets import DatasetError
    from kdcache.heads import HeadError
    from kdcache.methods import MethodError
    from kdcache.scenarios import ScenarioError
    from kdcache.cache.backend import LocationError
    from kdcache.cache.format import CacheError
    from kdcache.students import StudentError
    from kdcache.teachers import TeacherError
    from kdcache.stages.config import ConfigError
    from kdcache.train.engine import TrainingDiverged
    from kdcache.weights import WeightsError

    # each names what the user gave (a flag, a file, a cache) and what to do; any other error, a ValueError from
    # deep inside a library included, is a bug of kdcache's
    named = (DatasetError, TeacherError, CacheError, HeadError, ConfigError, MethodError, ScenarioError,
             StudentError, WeightsError, TrainingDiverged, LocationError, *USER_OS_ERRORS)
    return isinstance(err, named) or isinstance(err, OSError) and err.errno in USER_ERRNOS


def _parse_options(pairs: List[str], flag: str) -> tuple:
    """KEY=VALUE pairs; values become int, then (finite) float, where they parse as such."""
    import math

    out = []
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise typer.BadParameter(f"{flag} expects KEY=VALUE, got {p!r}")
        for cast in (int, float, str):
            try:
                typed = cast(value)
            except ValueError:
                continue
            if cast is not float or math.isfinite(typed):  # nan, inf stay words
                out.append((key, typed))
                break
    return tuple(out)


def _flag_parameter(f: dataclasses.Field) -> inspect.Parameter:
    """The typer parameter of one schema field, from its declaration (flag, help, default shown)."""
    m = meta(f)
    flag, kind = flag_name(f), str(f.type).replace("| None", "").strip()
    name, text = flag[2:].replace("-", "_"), f"{m.help} (default: {shown_default(f)})"
    if m.required:
        return _param(name, str, typer.Option(..., flag, help=m.help))
    if kind in ("Names", "Pairs"):
        return _param(name, List[str], typer.Option([], flag, help=text))
    if kind == "bool" and m.negate:
        return _param(name, bool, typer.Option(False, flag, help=text))
    if kind == "bool":
        return _param(name, Optional[bool], typer.Option(None, f"{flag}/--no-{flag[2:]}" if m.both else flag,
                                                         help=text))
    return _param(name, Optional[{"int": int, "float": float}.get(kind, str)], typer.Option(None, flag, help=text))


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _field_values(cls, given: dict) -> dict:
    """Flag values -> field values: None where a flag was not given (the YAML or the default decides)."""
    values = {}
    for f in dataclasses.fields(cls):
        flag = flag_name(f)
        value, kind = given[flag[2:].replace("-", "_")], str(f.type)
        if kind == "Pairs":
            value = _parse_options(value, flag) or None
        elif kind == "Names":
            value = tuple(value) or None
        elif meta(f).negate:
            value = False if value else None
        values[f.name] = value
    return values


CONFIG = _param("config", Optional[str], typer.Option(None, help="YAML file of options (flags win over it)."))


def _stage_command(name: str, doc: str, done=None, yaml_file: bool = False) -> None:
    """Register `kdcache <name>`: one flag per field of the stage's schema, then stage.run(cfg)."""
    cls = STAGES[name]
    params = [_flag_parameter(f) for f in dataclasses.fields(cls)] + ([CONFIG] if yaml_file else [])

    def command(**given):
        import importlib

        from kdcache.stages.config import resolve

        stage = importlib.import_module(f"kdcache.stages.{name}")
        path = stage.run(resolve(cls, given.pop("config", None), **_field_values(cls, given)))
        if done is not None:
            from kdcache import dist

            if dist.rank() == 0:  # under torchrun, one line for the job
                typer.echo(done(path))

    command.__name__, command.__doc__ = name, doc
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name=name)(command)


_stage_command("extract", """Stage one: run the teacher once over every image into a sharded, resumable Zarr cache.

    Re-running the same command resumes: finished shards are kept, the rest are computed.
    Under torchrun, ranks take disjoint shards.
    """, lambda path: f"cache: {path}  (inspect: python cli.py info --cache {shlex.quote(str(path))})", True)
_stage_command("distill", "Stage two: train a student from the cached teacher outputs (the teacher never runs).",
               lambda path: f"run: {path}", True)
_stage_command("evaluate", """Stage three: top-1/top-5 per domain and split (student and teacher), params, MACs, CPU
    latency (fixed threads, warm-up, median and IQR), a folder timm loads by itself (export/),
    ONNX export checked with onnxruntime; writes report.json, report.md and plots into the run.""",
               lambda path: (path / "report.md").read_text())


@app.command()
def report(runs: List[str] = typer.Argument(..., help="Run folders, e.g. runs/*")):
    """One table across runs (student x method x scenario), from each run's report.json."""
    from pathlib import Path

    from kdcache.report import run_folders, table

    folders, files = run_folders([Path(r) for r in runs])
    if files:
        typer.echo(f"(skipped {', '.join(map(str, files))}: a file, not a run folder)", err=True)
    if not folders:
        typer.echo("no runs to report: none of the paths given is a run folder (train one with `python cli.py "
                   "distill`, then `python cli.py evaluate --run <run folder>`)", err=True)
        return
    text, missing = table(folders)
    typer.echo(text)
    for m in missing:
        typer.echo(f"(no report in {m}: run `python cli.py evaluate --run {shlex.quote(str(m))}`)", err=True)


_stage_command("demo", """The offline default end to end: ImageNet EfficientNet-Lite0 teacher over MNIST digits, 10
    labels per class; supervised, kd and customkd students; one table. Re-running reuses finished work.""")


@app.command()
def info(
    cache: str = typer.Option(..., help="Cache folder written by extract."),
    verify: bool = typer.Option(False, "--verify", help="Read back every done shard and check its checksum."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar of --verify."),
    show_views: int = typer.Option(0, "--show-views", min=0, help="Write a PNG of the first N rows' views as "
                                   "replayed (a mixed view beside its partner, with lambda or the box), each with "
                                   "the teacher's top class and probability from the cached logits; at most 16 "
                                   "pictures across, so the first views of a cache of many; its path is the last "
                                   "line printed (0: no picture)."),
    views_out: str = typer.Option(None, "--views-out", help="Where --show-views writes the PNG. (default: "
                                  "<cache>.views.png, beside the cache folder)"),
):
    """Describe a cache: teacher, dataset, views, completion, bad inputs, bytes per view."""
    from kdcache.cacheinfo import summarize
    from kdcache.cacheinfo import verify as verify_cache
    from kdcache.cache.store import CacheStore

    store = CacheStore.open(cache)
    s = summarize(store)
    problems = verify_cache(store, progress=not no_progress) if verify else None
    if as_json:
        typer.echo(json.dumps(s | ({"verify": problems} if verify else {}), indent=2))
    else:
        _print_summary(s)
        if verify:
            typer.echo("verify    ok: every done shard reads back and matches its checksum" if not problems
                       else "verify    FAILED:\n  " + "\n  ".join(problems))
    if show_views:
        from kdcache.viewpicture import default_picture_path, picture_notes, picture_views

        picture = picture_views(store, show_views, views_out or default_picture_path(cache))
        for note in picture_notes(store):
            typer.echo(note)
        typer.echo(str(picture))
    if verify and problems:
        raise typer.Exit(1)


def _mixed(views: dict) -> str:
    mix = views.get("mix")
    return f"; mixed views {mix['mode']} (prob {mix['prob']}, alpha {mix['alpha']})" if mix else ""


def _print_summary(s: dict) -> None:
    t, d = s["teacher"], s["dataset"]
    typer.echo(f"cache     {s['path']}")
    typer.echo(f"teacher   {t['name']} ({t['source']}, weights {t['weights']}), feature dim {t['feature_dim']}, "
               f"input {t['preprocess']['input_size']}px")
    typer.echo(f"dataset   {d['name']}: N={d['N']}, {d['classes']} classes, domains {', '.join(d['domains'])}")
    rows = s["row_order"]
    order = f"seed {rows['seed']}" if "seed" in rows else "the dataset's key order"
    typer.echo(f"rows      {rows['order']} ({order})")
    typer.echo(f"views     V={s['views']['V']} (policy {s['views']['policy']}, seed {s['views']['seed']}); "
               f"tokens grid {s['tokens']['grid']}; head {s['head']['kind']}"
               + (f", logits top-{s['head']['logits_topk']}" if s["head"].get("logits_topk") else "") + _mixed(s['views'])
               + ("" if s["head_fitted"] else " (NOT FITTED: run the extract command again)"))
    sh, r = s["shards"], s["rows"]
    typer.echo(f"progress  {sh['done']}/{sh['total']} shards; rows done {r['done']}, bad {r['bad']}, "
               f"todo {r['todo']}  {'(complete)' if s['complete'] else '(incomplete: re-run extract to resume)'}")
    bpv = ", ".join(f"{k} {v:.0f} B" for k, v in s["bytes_per_view"].items())
    typer.echo(f"bytes/view {bpv} (features stored as {s['storage']['feature_dtype']})")
    for b in s["bad_inputs"]:
        typer.echo(f"  bad row {b['row']} {b['key']}: {b['reason']}")
    if s["rows"]["bad"] > len(s["bad_inputs"]):
        typer.echo(f"  ... and {s['rows']['bad'] - len(s['bad_inputs'])} more bad rows")


def run() -> None:
    """The `kdcache` console script (also `python -m kdcache` and `python cli.py` in a checkout)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack (a stuck job says where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    app()


if __name__ == "__main__":
    run()
