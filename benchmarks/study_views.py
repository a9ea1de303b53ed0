"""How many views the cache needs, and what mixed views add: one table and one chart over the views suites.

    python benchmarks/study_views.py --run   # runs (or finishes) every suite, then the report (`make study` does)
    python benchmarks/study_views.py         # study-views.md and study-views.png from the finished runs

`--run` runs, through benchmarks/study.py, each views suite (iconshift-views4, -views4-mix, -views16,
-views16-mix; demo-views3, -views16, -views16-mix) and each logits suite (iconshift-logits-dense, -top10) at the
long budget, and kd and customkd of the default caches at the short one (`commands` below); each suite's
`--prepare` extracts its cache first. One suite alone: `python benchmarks/study.py --suite iconshift-views16
--budgets long --prepare`.

Each suite is one cache (benchmarks/study.py VIEW_CACHES, DEMO_VIEW_CACHES) and the same runs on every pair: the
student's top-1 on the target, mean and std over seeds, at equal epochs. The teacher's ceiling (a linear probe on
the labelled rows, read from a cache's clean views) is the same for every cache of a dataset: their clean views
are equal.
The online reference runs the teacher on every step, on views drawn anew every epoch (`distill --online-teacher
--online-views fresh`): what a cache of unlimited views would give. The logits suites compare dense and top-10
logits of a probe head fitted on the source's labels alone, which the faenza->tango runs read from the cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402

ICON_SUITES = [study.SUITES["iconshift-" + name] for name in study.VIEW_CACHES]
DEMO_SUITES = [study.SUITES["demo-" + name] for name in study.DEMO_VIEW_CACHES]
SUITES = ICON_SUITES + DEMO_SUITES
DEMO_PAIR = "demo (MNIST, ssl)"
LOGIT_SUITES = [study.SUITES["iconshift-logits-" + name] for name in study.LOGIT_CACHES]


def views_of(suite) -> int:
    """V of the suite's cache: its extraction settings, else the extractor's default (the demo's for the demo)."""
    from kdcache.schema import DemoConfig, ExtractConfig

    return suite.extract.get("views", (DemoConfig if suite in DEMO_SUITES else ExtractConfig)().views)


def pair_label(suite, pair: tuple) -> str:
    return DEMO_PAIR if suite in DEMO_SUITES else study.pair_name(pair)


def is_online(row) -> bool:
    return dict(row.distill).get("online_views") == "fresh"


def collect() -> list[dict]:
    """One entry per (suite, pair, row, budget) that has results: its views, mixing, and mean/std/n of top-1 %."""
    out = []
    for suite in SUITES + LOGIT_SUITES:
        results = study.load_results(suite)
        for pair in suite.pairs:
            for row in suite.rows:
                for budget, epochs in suite.budgets.items():
                    runs = [r for r in results if r["row"] == row.label and r["budget"] == budget
                            and r["pair"] == study.pair_name(pair)]
                    if not runs:
                        continue
                    m, s, n = study.summarise([r["top1"] for r in runs])
                    firsts = [t for t in (study.teacher_top1(r, 0) for r in runs) if t is not None]
                    lasts = [t for t in (study.teacher_top1(r, -1) for r in runs) if t is not None]
                    out.append({"suite": suite.name, "pair": pair_label(suite, pair), "views": views_of(suite),
                                "mix": suite.extract.get("mix", "none"),
                                "online": is_online(row), "topk": suite.extract.get("logits_topk", 0),
                                "method": row.method, "budget": budget, "epochs": epochs, "mean": m, "std": s, "n": n,
                                "seconds": float(np.mean([r["train_seconds"] for r in runs])),
                                "teacher": (study.cell(firsts), study.cell(lasts)) if lasts else ("-", "-")})
    return out


def bytes_per_view(suite) -> float | None:
    """The cache's logits on disk, bytes a view (None: not extracted here)."""
    from kdcache.cache.store import CacheStore
    from kdcache.cacheinfo import summarize

    path = study.ROOT / suite.cache
    return summarize(CacheStore.open(path))["bytes_per_view"].get("logits") if path.is_dir() else None


def logits_report(entries: list[dict]) -> list[str]:
    """Dense against top-10 logits: one line per method, with the logits' bytes a view on disk."""
    if not entries:
        return []
    lines = ["", "## Dense and top-10 logits", "",
             f"{entries[0]['pair']}: caches of the two domains whose probe head saw the source's labels alone, so "
             "that the runs read the cached logits (a head that saw target labels is refitted from the features, "
             "and its logits are never read). The same views and features; only the stored logits differ. Top-1 % "
             "on the target, long budget.", "",
             "| method | dense | top-10 | top-10 − dense |", "| --- | --- | --- | --- |"]
    for method in sorted({e["method"] for e in entries}):
        got = {e["topk"]: e for e in entries if e["method"] == method and e["budget"] == "long"}
        cells = [_mean(e) if e else "-" for e in (got.get(0), got.get(10))]
        diff = f"{got[10]['mean'] - got[0]['mean']:+.1f}" if 0 in got and 10 in got else "-"
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {diff} |")
    dense, top = (bytes_per_view(s) for s in LOGIT_SUITES)
    if dense and top:
        lines += ["", f"Logits on disk, as stored (compressed): dense {dense:.0f} B a view, top-10 {top:.0f} B a view."]
    return lines


def views_table(entries: list[dict], pair: str, ceiling: float | None) -> list[str]:
    lines = ["", f"## {pair}", ""]
    if ceiling is not None:
        lines += [f"Teacher ceiling (linear probe on the labelled rows; the demo: mean over the seeds' label "
                  f"draws): {ceiling:.1f}.", ""]
    lines += ["| method | views | mixing | budget | top-1 | customised teacher, first / last phase | "
              "train seconds (mean, shared CPU) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    mine = [e for e in entries if e["pair"] == pair]
    for e in sorted(mine, key=lambda e: (e["method"], e["budget"], e["online"], e["views"], e["mix"])):
        std = f" ± {e['std']:.1f}" if e["n"] > 1 else ""
        v = "online, fresh every epoch" if e["online"] else e["views"]
        lines.append(f"| {e['method']} | {v} | {e['mix']} | {e['budget']} ({e['epochs']} ep) | "
                     f"{e['mean']:.1f}{std} (n={e['n']}) | {e['teacher'][0]} / {e['teacher'][1]} | {e['seconds']:.0f} |")
    return lines + gaps(mine)


def report(entries: list[dict], ceilings: dict) -> str:
    icon, demo = ICON_SUITES[0], DEMO_SUITES[0]
    lines = ["# How many views, and mixed views", "",
             f"IconShift-dev, uda, {icon.student} from scratch at {icon.image_size} px (long budget "
             f"{icon.budgets['long']} epochs, short {icon.budgets['short']}); the demo, MNIST ssl with "
             f"{demo.labels_per_class} labels a class, {demo.student} from scratch at {demo.image_size} px (long "
             f"{demo.budgets['long']}, short {demo.budgets['short']}). One cache per "
             "row group (views V, mixing), extracted with the same teacher and settings; views drawn without "
             "replacement across epochs. Top-1 % on the target (the demo: its test rows), mean ± std over seeds "
             "(n). The online reference: "
             "the teacher run on every step on views drawn anew every epoch (`--online-teacher --online-views "
             "fresh`, from the V = 4 cache). Reproduce: the commands at the top of `benchmarks/study_views.py`.", "",
             "`customised teacher`: CustomKD's customised classifier on the target, top-1 % at the first phase and "
             "at the last (on IconShift-dev the same for every seed: the teacher-only chain; on the demo it moves "
             "with the seed's labelled rows)."]
    views = [e for e in entries if e["suite"] in {s.name for s in SUITES}]
    for pair in dict.fromkeys(e["pair"] for e in views):
        lines += views_table(views, pair, ceilings.get(pair))
    lines += logits_report([e for e in entries if e["suite"] in {s.name for s in LOGIT_SUITES}])
    return "\n".join(lines) + "\n"


def gaps(entries: list[dict]) -> list[str]:
    """Per method, the best cached V against the online reference (long budget)."""
    out = []
    for method in sorted({e["method"] for e in entries}):
        longs = [e for e in entries if e["method"] == method and e["budget"] == "long"]
        online = [e for e in longs if e["online"]]
        cached = [e for e in longs if not e["online"]]
        if online and cached:
            best, ref = max(cached, key=lambda e: e["mean"]), online[0]
            out.append(f"- {method}: the best cache (V = {best['views']}, mixing {best['mix']}) {_mean(best)} against "
                       f"online on fresh views {_mean(ref)}: {best['mean'] - ref['mean']:+.1f} points.")
    return ["", "Cached against online, long budget:", ""] + out if out else []


def _mean(e: dict) -> str:
    return f"{e['mean']:.1f} ± {e['std']:.1f} (n={e['n']})" if e["n"] > 1 else f"{e['mean']:.1f} (n=1)"


def chart(entries: list[dict], ceilings: dict, path: Path) -> None:
    """Top-1 against V at the long budget, one panel per pair, one line per method (and mixing), the online
    reference as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in entries if e["suite"] in {s.name for s in SUITES} and e["budget"] == "long"]
    pairs = list(dict.fromkeys(e["pair"] for e in entries))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        mine, colours = [e for e in entries if e["pair"] == pair], {}
        for method in sorted({e["method"] for e in mine}):
            for mix, style in (("none", "-o"), ("both", "--s")):
                pts = sorted((e["views"], e["mean"], e["std"]) for e in mine
                             if e["method"] == method and e["mix"] == mix and not e["online"])
                if pts:
                    v, m, s = (np.array(x, dtype=float) for x in zip(*pts))
                    line = ax.errorbar(v, m, yerr=np.nan_to_num(s), fmt=style, capsize=3, color=colours.get(method),
                                       label=method + ("" if mix == "none" else " (mixed views)"))
                    colours.setdefault(method, line[0].get_color())
            for e in (e for e in mine if e["method"] == method and e["online"]):
                ax.axhspan(e["mean"] - e["std"], e["mean"] + e["std"], color=colours.get(method, "gray"), alpha=0.15,
                           label=f"{method}, online on fresh views")
        if ceilings.get(pair) is not None:
            ax.axhline(ceilings[pair], color="gray", lw=1, ls=":", label="teacher probe")
        ax.set_xscale("log", base=2)
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("views per image in the cache (V)")
        ax.set_ylabel("target top-1 % (long budget)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def commands(seeds: int, jobs: int) -> list[list[str]]:
    """The benchmarks/study.py runs behind the report, each resumable (`--run`): every views and logits suite at the
    long budget (the views suites on every pair, the online reference on the first), and the short budget for the
    kd and customkd rows of the default caches (V = 4; the demo's V = 3)."""
    common = ["--seeds", str(seeds), "--jobs", str(jobs), "--no-report", "--prepare"]
    out = [["--suite", s.name, "--budgets", "long", *common] for s in SUITES + LOGIT_SUITES]
    for s in (ICON_SUITES[0], DEMO_SUITES[0]):
        out.append(["--suite", s.name, "--budgets", "short", "--rows", *(r.label for r in study.VIEWS_ROWS), *common])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run (or finish) every suite of the report first")
    ap.add_argument("--seeds", type=int, default=3, help="with --run")
    ap.add_argument("--jobs", type=int, default=1, help="with --run: runs in parallel, one process each")
    a = ap.parse_args(argv)
    if a.run:
        for command in commands(a.seeds, a.jobs):
            print("[study-views] benchmarks/study.py " + " ".join(command), file=sys.stderr)
            study.main(command)
    entries = collect()
    if not entries:
        raise SystemExit("no results yet: run the study commands at the top of this file")
    ceilings = {}
    if (study.ROOT / ICON_SUITES[0].cache).is_dir():
        ceilings = {study.pair_name(p): study.teacher_ceiling(ICON_SUITES[0], p, 0)["probe"] * 100
                    for p in ICON_SUITES[0].pairs}
    demo = next((s for s in DEMO_SUITES if (study.ROOT / s.cache).is_dir()), None)
    if demo is not None:  # every demo cache has the same clean views; the labelled rows change with the seed
        ceilings[DEMO_PAIR] = 100 * float(np.mean([study.teacher_ceiling(demo, (), seed)["probe"]
                                                   for seed in range(3)]))
    text = report(entries, ceilings)
    (study.RESULTS / "study-views.md").write_text(text)
    chart(entries, ceilings, study.RESULTS / "study-views.png")
    print(text)


if __name__ == "__main__":
    main()
