"""Reports: report.json, report.md and PNG plots of one run; one table across many runs."""
from __future__ import annotations

import json
from pathlib import Path

from .files import write_atomic
from .options import ConfigError
from .run_files import RunFileError, read_metrics

# what `report` reads from each run's report.json (written by evaluate): a name, or a number
REPORT_FIELDS = {"student": str, "method": str, "scenario": str, "run": str, "student_metrics/top1": float,
                 "teacher_metrics/top1": float, "params": float, "macs": float, "latency_cpu_b1/median_ms": float}


def _plots(run_dir: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    s, t = report["student_metrics"]["groups"], report["teacher_metrics"]["groups"]
    names = [n for n in s if "/" not in n] or list(s)
    if names:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.2))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [s[n]["top1"] for n in names], 0.4, label="student")
        ax.bar([i + 0.2 for i in x], [t.get(n, {}).get("top1", 0) for n in names], 0.4, label="teacher")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("top-1")
        ax.set_title(f"{report['run']}: per-domain accuracy", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy_per_domain.png", dpi=100)
        plt.close(fig)
        made.append("accuracy_per_domain.png")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        recs = read_metrics(metrics, "remove that line, or the file (only this plot reads it), and evaluate again")
        if recs:
            fig, ax1 = plt.subplots(figsize=(5, 3.2))
            ep = [r["epoch"] + 1 for r in recs]
            ax1.plot(ep, [r.get("loss", float("nan")) for r in recs], "o-", label="train loss")
            ax1.set_xlabel("epoch")
            ax1.set_ylabel("loss")
            ax2 = ax1.twinx()
            ev = [(r["epoch"] + 1, r["eval"]["top1"]) for r in recs if "eval" in r]
            if ev:
                ax2.plot(*zip(*ev), "s--", color="tab:green", label="eval top-1")
                ax2.set_ylim(0, 1)
                ax2.set_ylabel("top-1")
            handles = ax1.get_legend_handles_labels()
            if ev:
                more = ax2.get_legend_handles_labels()
                handles = (handles[0] + more[0], handles[1] + more[1])
            ax1.legend(*handles, loc="center right", fontsize=8)
            ax1.set_title(f"{report['run']}: training", fontsize=9)
            fig.tight_layout()
            fig.savefig(run_dir / "training_curves.png", dpi=100)
            plt.close(fig)
            made.append("training_curves.png")
    return made


def flatten(record: dict) -> dict:
    """One epoch record with nested keys joined by '/' (eval/top1, eval/per_domain/<domain>/top1)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[prefix] = value

    walk("", record)
    return flat


def metrics_csv(run_dir: Path) -> Path:
    """metrics.csv from metrics.jsonl: one row per epoch, one column per number (nested keys joined with
    '/', e.g. eval/top1, eval/groups/<domain>/top1), for spreadsheets and pandas."""
    import csv
    import io

    rows = [flatten(r) for r in read_metrics(run_dir / "metrics.jsonl", "remove that line (its epoch's record is "
                                             "then missing from the run) and run the same command again")]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path = run_dir / "metrics.csv"
    write_atomic(path, text.getvalue())
    return path


class TensorBoardLog:
    """Epoch metrics as TensorBoard scalars in <run>/tensorboard (the optional `tensorboard` package);
    step = epoch number. A resumed run first drops what the earlier attempt logged past its checkpoint."""

    def __init__(self, run_dir: Path, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_epoch + 1)

    def log(self, record: dict) -> None:
        step = int(record["epoch"]) + 1
        for key, value in flatten(record).items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'kdcache[tensorboard]')") from None


def write_report(run_dir: Path, report: dict) -> None:
    report = dict(report, plots=_plots(run_dir, report))
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2))
    s, t = report["student_metrics"], report["teacher_metrics"]
    lines = [f"# {report['run']}", "",
             f"student `{report['student']}` ({report['method']}), teacher `{report['teacher']}`, "
             f"scenario {report['scenario']}", "",
             "| samples | student top-1 | student top-5 | teacher top-1 | n |", "| --- | --- | --- | --- | --- |",
             f"| all | {s['top1']:.4f} | {s['top5']:.4f} | {t['top1']:.4f} | {s['n']} |"]
    for name, g in s["groups"].items():
        lines.append(f"| {name} | {g['top1']:.4f} | {g['top5']:.4f} | {t['groups'].get(name, {}).get('top1', float('nan')):.4f} "
                     f"| {g['n']} |")
    lines += ["", f"- params: {report['params']:,}", f"- MACs at {report['image_size']} px: {report['macs']:,}"]
    for key in ("latency_cpu_b1", "latency_cpu_batch"):
        lat = report.get(key)
        if lat:
            iqr = lat.get("iqr_ms")
            lines.append(f"- CPU latency, batch {lat.get('batch', 1)}: median {lat['median_ms']:.2f} ms"
                         + (f" (IQR {iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")
                         + f", p90 {lat['p90_ms']:.2f} ms; {lat['threads']} thread(s), {lat['repeats']} timed passes")
    if "onnx" in report:
        lines.append(f"- ONNX: `{Path(report['onnx']['path']).name}`, max |onnxruntime - torch| = "
                     f"{report['onnx']['max_abs_diff']:.2e}")
    lines += [""] + [f"![{p}]({p})" for p in report["plots"]]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def read_report(run_dir: Path) -> dict | None:
    """A run's report.json, or None when the run has not been evaluated yet; a ConfigError naming a missing
    folder, a RunFileError naming a damaged report."""
    import shlex

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder")
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    p = run_dir / "report.json"
    if not p.is_file():
        return None
    redo = f"run `python cli.py evaluate --run {shlex.quote(str(run_dir))}` again to rewrite it"
    try:
        r = json.loads(p.read_bytes())
    except (ValueError, OSError) as e:  # truncated, not UTF-8, not JSON, unreadable
        raise RunFileError(f"{p} cannot be read ({e}); {redo}") from None
    lost = _missing_field(r)
    if lost:
        raise RunFileError(f"{p} is not a report evaluate wrote ({lost} is missing or not a "
                         f"{'name' if REPORT_FIELDS[lost] is str else 'number'}); {redo}")
    return r


def _missing_field(report) -> str | None:
    """The first of REPORT_FIELDS that `report` lacks or holds with the wrong kind of value."""
    for name, kind in REPORT_FIELDS.items():
        value = report
        for key in name.split("/"):
            value = value.get(key) if isinstance(value, dict) else None
        number = isinstance(value, float) or isinstance(value, int) and not isinstance(value, bool) \
            and value.bit_length() < 1000  # a float can hold it (the table divides it)
        if not (isinstance(value, str) if kind is str else number):
            return name
    return None


def run_folders(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the paths that may be run folders, the files among them): a shell glob such as `runs/*` takes the files
    beside the runs too (runs/README.md), which are no runs and are left out; a path that does not exist is kept
    (read_report names it)."""
    files = [p for p in paths if p.exists() and not p.is_dir()]
    return [p for p in paths if p not in files], files


def table(run_dirs: list[Path]) -> tuple[str, list[str]]:
    """One markdown table across runs; returns (table, runs that have no report yet)."""
    rows, missing = [], []
    for d in run_dirs:
        r = read_report(d)
        if r is None:
            missing.append(str(d))
            continue
        rows.append((r["student"], r["method"], r["scenario"], r["student_metrics"]["top1"],
                     r["teacher_metrics"]["top1"], r["params"], r["macs"], r["latency_cpu_b1"]["median_ms"], r["run"]))
    rows.sort(key=lambda x: (x[2], x[0], -x[3]))
    out = ["| student | method | scenario | top-1 | teacher top-1 | params | MACs | CPU ms (b=1) | run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for st, m, sc, a, ta, p, macs, ms, name in rows:
        out.append(f"| {st} | {m} | {sc} | {a:.4f} | {ta:.4f} | {p / 1e6:.2f}M | {macs / 1e6:.1f}M | {ms:.2f} | {name} |")
    return "\n".join(out), missing
