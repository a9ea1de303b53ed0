"""The `kdcache` command line: flags -> a stage config -> kdcache.stages.X.run(cfg)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import sys
import traceback
from typing import List, Optional

import typer
from typer.core import TyperGroup

from kdcache.stages.schema import FLAG_FIELDS

# click's exceptions, from the click that this typer uses (its own copy in newer versions)
ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
NoArgsIsHelp = getattr(sys.modules[ClickError.__module__], "NoArgsIsHelpError", ())
CLICK_SIGNALS = (typer.Exit, typer.Abort, ClickError)  # what click itself turns into an exit code

DEBUG = {"on": False}  # set by each invocation: --debug or KDCACHE_DEBUG=1
# errors of the user's files or of the machine, not of kdcache: one line naming the file, like any user error
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
USER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


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


def _fail(err: Exception) -> None:
    if DEBUG["on"]:
        traceback.print_exception(err)
    typer.secho(f"error: {_message(err)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
        if _is_user_error(e):
            _fail(e)
        if DEBUG["on"]:
            raise
        typer.secho(f"error: unexpected {type(e).__name__}: {_message(e)} (a bug in kdcache: rerun with --debug for "
                    "the traceback and report it)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _is_user_error(err: Exception) -> bool:
    from kdcache.datasets import DatasetError
    from kdcache.heads import HeadError
    from kdcache.methods import MethodError
    from kdcache.scenarios import ScenarioError
    from kdcache.cache.format import CacheError
    from kdcache.students import StudentError
    from kdcache.teachers import TeacherError
    from kdcache.stages.config import ConfigError

    named = (DatasetError, TeacherError, CacheError, HeadError, ConfigError, MethodError, ScenarioError,
             StudentError, ValueError, *USER_OS_ERRORS)
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


@app.command()
def extract(
    dataset: Optional[str] = typer.Option(None, help="Dataset layout: domainnet, officehome, cifar100, imagenet, "
                                          "imagefolder, synthetic, mnist5k (the offline demo digits)."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the dataset in its on-disk layout."),
    dataset_opt: List[str] = typer.Option([], help="Dataset option KEY=VALUE (e.g. n=512 for synthetic)."),
    domain: List[str] = typer.Option([], help="Only these domains (repeat the flag)."),
    teacher: Optional[str] = typer.Option(None, help="timm name, or open_clip:ARCH/TAG "
                                          "(default vit_large_patch14_dinov2.lvd142m)."),
    teacher_weights: Optional[str] = typer.Option(None, help="Local weights (safetensors or state dict) for "
                                                  "machines without a model hub."),
    teacher_input_size: Optional[int] = typer.Option(None, help="Teacher input size in pixels (default: the "
                                                     "model's own; ViTs resize their position embeddings)."),
    random_init: Optional[bool] = typer.Option(None, "--random-init", help="Random teacher weights (tests and "
                                               "benchmarks only)."),
    feature: Optional[str] = typer.Option(None, help="open_clip only: pre_projection (default) or embedding."),
    views: Optional[int] = typer.Option(None, help="Views per image; view 0 is the clean eval view (default 4)."),
    view_policy: Optional[str] = typer.Option(None, help="Augmentation policy for views 1..V-1: default, light."),
    view_seed: Optional[int] = typer.Option(None, help="Seed the view parameters are drawn with."),
    tokens: Optional[int] = typer.Option(None, help="Also cache patch tokens pooled to a GxG grid (0: off)."),
    head: Optional[str] = typer.Option(None, help="auto, native, zeroshot, probe or none."),
    batch_size: Optional[int] = typer.Option(None, help="View-images per teacher forward pass."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes that pack and decode."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard (unit of work and of resume)."),
    image_bound: Optional[int] = typer.Option(None, help="Longer side of the packed images, in pixels."),
    compression: Optional[str] = typer.Option(None, help="zstd, blosc or none."),
    feature_dtype: Optional[str] = typer.Option(None, help="float16 (default) or int8: features and tokens as int8 "
                                                "with one float32 scale per vector (about half the bytes)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    decode: Optional[str] = typer.Option(None, help="Where views are decoded and replayed: workers (default) or "
                                         "device (JPEGs by nvJPEG on a GPU; pixels within one level of the workers')."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last", help="Teacher in channels-last format."),
    compile: Optional[str] = typer.Option(None, help="torch.compile the teacher: off (default), default, "
                                          "reduce-overhead (CUDA graphs) or max-autotune."),
    out: Optional[str] = typer.Option(None, help="Cache folder (default cache/<dataset>)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a cache made with other settings."),
    part: Optional[str] = typer.Option(None, help="i/N: work only on shards k with k % N == i (a job-array "
                                       "task's share; N tasks together fill the cache). auto/N or auto: i (and N) "
                                       "from SLURM_ARRAY_TASK_ID/_MIN/_COUNT or JOB_COMPLETION_INDEX."),
    repair: Optional[bool] = typer.Option(None, "--repair", help="Re-check every done shard against its recorded "
                                          "checksum and recompute only the damaged ones."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    config: Optional[str] = typer.Option(None, help="YAML file of options (flags win over it)."),
):
    """Stage one: run the teacher once over every image into a sharded, resumable Zarr cache.

    Re-running the same command resumes: finished shards are kept, the rest are computed.
    Under torchrun, ranks take disjoint shards.
    """
    from kdcache.stages import extract as stage
    from kdcache.stages.config import resolve

    cfg = resolve(stage.ExtractConfig, config, dataset=dataset, data_root=data_root,
                  dataset_options=_parse_options(dataset_opt, "--dataset-opt") or None, domains=tuple(domain) or None,
                  teacher=teacher, teacher_weights=teacher_weights,
                  teacher_input_size=teacher_input_size, random_init=random_init, feature=feature,
                  views=views, view_policy=view_policy, view_seed=view_seed, tokens=tokens, head=head,
                  batch_size=batch_size, workers=workers, shard_size=shard_size, image_bound=image_bound,
                  compression=compression, feature_dtype=feature_dtype, device=device, out=out, overwrite=overwrite,
                  repair=repair, part=part, progress=False if no_progress else None, decode=decode,
                  channels_last=channels_last, compile=compile)
    path = stage.run(cfg)
    typer.echo(f"cache: {path}  (inspect: python cli.py info --cache {shlex.quote(str(path))})")


@app.command()
def distill(
    cache: Optional[str] = typer.Option(None, help="Cache folder written by extract."),
    student: Optional[str] = typer.Option(None, help="Any timm model name (default mobilenetv3_large_100)."),
    student_weights: Optional[str] = typer.Option(None, help="Backbone weights for the student (safetensors or "
                                                  "state dict); its classifier is always new."),
    method: Optional[str] = typer.Option(None, help="customkd (default), supervised, kd, fitnet, dkd, kdep, scalekd."),
    method_opt: List[str] = typer.Option([], help="Method option KEY=VALUE (e.g. temperature=2)."),
    scenario: Optional[str] = typer.Option(None, help="uda, ssl or supervised (default)."),
    source: List[str] = typer.Option([], help="uda: labelled source domain (repeat the flag)."),
    target: List[str] = typer.Option([], help="uda: unlabelled target domain, also evaluated (repeat)."),
    closed_set: Optional[bool] = typer.Option(None, "--closed-set", help="uda: keep only the target rows of "
                                              "classes the source has (a closed-set benchmark from domains whose "
                                              "class sets differ)."),
    labels_per_class: Optional[int] = typer.Option(None, help="ssl: labelled samples per class (seeded)."),
    online_teacher: Optional[bool] = typer.Option(None, "--online-teacher", help="Run the cache's teacher on the "
                                                  "same replayed views every step instead of reading the cache "
                                                  "(a reference that measures what caching costs; slow)."),
    teacher_weights: Optional[str] = typer.Option(None, help="--online-teacher: the teacher's weights (default: "
                                                  "the file the cache was extracted with)."),
    teacher_adapt: Optional[int] = typer.Option(None, help="Rounds of self-training of the teacher head on the "
                                                "unlabelled rows' cached features before distilling (0: off; "
                                                "never reads their labels)."),
    labelled_ratio: Optional[float] = typer.Option(None, help="Least fraction of labelled samples per epoch "
                                                   "(labelled rows are repeated to reach it; default 0.25, "
                                                   "0 keeps the natural mix)."),
    epochs: Optional[int] = typer.Option(None, help="Distillation epochs (default 10)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default 64)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (cosine schedule with warm-up)."),
    optimizer: Optional[str] = typer.Option(None, help="adamw (default) or sgd."),
    weight_decay: Optional[float] = typer.Option(None, help="Decoupled weight decay (AdamW) or L2 (SGD)."),
    decay_norm_bias: Optional[bool] = typer.Option(None, "--decay-norm-bias/--no-decay-norm-bias",
                                                   help="Weight decay on norm weights and biases too. The "
                                                   "default exempts them (timm's parameter groups, as timm "
                                                   "trains); --decay-norm-bias decays every parameter, as runs "
                                                   "made before that default did."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Epochs of linear learning-rate warm-up before the "
                                                  "cosine decay (fractions allowed)."),
    shuffle_buffer: Optional[int] = typer.Option(None, help="Samples in the stream's shuffle buffer (rows)."),
    image_size: Optional[int] = typer.Option(None, help="Student input size (default: the student's own)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N epochs (and after the last)."),
    seed: Optional[int] = typer.Option(None, help="Seed for labels-per-class, shard order and views."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    out: Optional[str] = typer.Option(None, help="Run folder (default runs/<UTC time>-<method>-<student>-<hash of the settings>; with --resume "
                                     "and no --out: the newest run of the same settings)."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from the run's last checkpoint."),
    no_check_dataset: bool = typer.Option(False, "--no-check-dataset", help="Do not re-scan the original "
                                          "dataset to compare its fingerprint."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard", help="Also log the epoch metrics to "
                                               "<run>/tensorboard (needs: pip install tensorboard)."),
    config: Optional[str] = typer.Option(None, help="YAML file of options (flags win over it)."),
):
    """Stage two: train a student from the cached teacher outputs (the teacher never runs)."""
    from kdcache.stages import distill as stage
    from kdcache.stages.config import resolve

    cfg = resolve(stage.DistillConfig, config, cache=cache, student=student, student_weights=student_weights,
                  method=method, method_options=_parse_options(method_opt, "--method-opt") or None,
                  scenario=scenario,
                  source=tuple(source) or None, target=tuple(target) or None, closed_set=closed_set,
                  labels_per_class=labels_per_class, teacher_adapt=teacher_adapt, online_teacher=online_teacher,
                  teacher_weights=teacher_weights, labelled_ratio=labelled_ratio,
                  epochs=epochs,
                  batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                  decay_norm_bias=decay_norm_bias,
                  warmup_epochs=warmup_epochs, shuffle_buffer=shuffle_buffer, image_size=image_size, workers=workers,
                  eval_every=eval_every, seed=seed, device=device, out=out, resume=resume,
                  check_dataset=False if no_check_dataset else None, progress=False if no_progress else None,
                  tensorboard=tensorboard)
    path = stage.run(cfg)
    typer.echo(f"run: {path}")


@app.command()
def evaluate(
    run: str = typer.Option(..., help="Run folder written by distill (runs/<name>)."),
    batch_size: Optional[int] = typer.Option(None, help="Evaluation batch size."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
    latency_repeats: Optional[int] = typer.Option(None, help="Timed CPU forward passes per latency figure "
                                                  "(default 50, after 10 warm-up passes)."),
    latency_threads: Optional[int] = typer.Option(None, help="CPU threads for the latency figures (default 1)."),
    latency_batch: Optional[int] = typer.Option(None, help="Batch size of the second latency figure (default 8; "
                                                "0: batch 1 only)."),
    no_onnx: bool = typer.Option(False, "--no-onnx", help="Skip the ONNX export and its onnxruntime check."),
    device: Optional[str] = typer.Option(None, help="Device for the accuracy pass (latency is always CPU)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
):
    """Stage three: top-1/top-5 per domain and split (student and teacher), params, MACs, CPU latency
    (fixed threads, warm-up, median and IQR), a folder timm loads by itself (export/),
    ONNX export checked with onnxruntime; writes report.json, report.md and plots into the run."""
    from kdcache.stages import evaluate as stage
    from kdcache.stages.config import resolve

    cfg = resolve(stage.EvaluateConfig, None, run=run, batch_size=batch_size, workers=workers,
                  latency_repeats=latency_repeats, latency_threads=latency_threads,
                  latency_batch=latency_batch, onnx=False if no_onnx else None, device=device,
                  progress=False if no_progress else None)
    path = stage.run(cfg)
    typer.echo((path / "report.md").read_text())


@app.command()
def report(runs: List[str] = typer.Argument(..., help="Run folders, e.g. runs/*")):
    """One table across runs (student x method x scenario), from each run's report.json."""
    from pathlib import Path

    from kdcache.report import table

    text, missing = table([Path(r) for r in runs])
    typer.echo(text)
    for m in missing:
        typer.echo(f"(no report in {m}: run `python cli.py evaluate --run {shlex.quote(str(m))}`)", err=True)


@app.command()
def demo(
    epochs: Optional[int] = typer.Option(None, help="Distillation epochs per student (default 8)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
):
    """The offline default end to end: ImageNet EfficientNet-Lite0 teacher over MNIST digits, 10 labels per
    class; supervised, kd and customkd students; one table. Re-running reuses finished work."""
    from kdcache.stages import demo as stage
    from kdcache.stages.config import resolve

    stage.run(resolve(stage.DemoConfig, None, epochs=epochs, workers=workers,
                      progress=False if no_progress else None))


@app.command()
def info(
    cache: str = typer.Option(..., help="Cache folder written by extract."),
    verify: bool = typer.Option(False, "--verify", help="Read back every done shard and check its checksum."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar of --verify."),
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
    if verify and problems:
        raise typer.Exit(1)


def _print_summary(s: dict) -> None:
    t, d = s["teacher"], s["dataset"]
    typer.echo(f"cache     {s['path']}")
    typer.echo(f"teacher   {t['name']} ({t['source']}, weights {t['weights']}), feature dim {t['feature_dim']}, "
               f"input {t['preprocess']['input_size']}px")
    typer.echo(f"dataset   {d['name']}: N={d['N']}, {d['classes']} classes, domains {', '.join(d['domains'])}")
    typer.echo(f"views     V={s['views']['V']} (policy {s['views']['policy']}, seed {s['views']['seed']}); "
               f"tokens grid {s['tokens']['grid']}; head {s['head']['kind']}"
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


def _show_defaults() -> None:
    """Append each stage option's default, read from the stage's schema, to its --help text."""
    import dataclasses
    import inspect

    from typer.models import OptionInfo

    from kdcache.stages import schema

    schemas = {"extract": schema.ExtractConfig, "distill": schema.DistillConfig,
               "evaluate": schema.EvaluateConfig, "demo": schema.DemoConfig}
    for command in app.registered_commands:
        cls = schemas.get(command.callback.__name__)
        if cls is None:
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, param in inspect.signature(command.callback).parameters.items():
            info, key = param.default, FLAG_FIELDS.get(name, name)
            if not isinstance(info, OptionInfo) or key not in defaults or name.startswith("no_"):
                continue
            value = defaults[key]
            if value is None or value == () or "default" in (info.help or "").lower():
                continue
            shown = ("on" if value else "off") if isinstance(value, bool) else value
            info.help = f"{(info.help or '').rstrip()} (default: {shown})"


_show_defaults()


def run() -> None:
    """The `kdcache` console script (also `python -m kdcache` and `python cli.py` in a checkout)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack (a stuck job says where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    app()


if __name__ == "__main__":
    run()
