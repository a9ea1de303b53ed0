"""How many views the cache needs, and what mixed views add: one table and one chart over the views suites.

    python benchmarks/study.py --suite iconshift-views4 --budgets long      # kd and customkd, V = 4
    python benchmarks/study.py --suite iconshift-views16 --budgets long     # V = 16 (extracts its cache first)
    python benchmarks/study.py --suite iconshift-views16-mix --budgets long # V = 16, mixup and cutmix views
    python benchmarks/study_views.py                                        # study-views.md and study-views.png

Each suite is one cache (benchmarks/study.py VIEW_CACHES) and the same runs: the student's top-1 on the
target, mean and std over seeds, at equal epochs. The teacher's ceiling (a linear probe on the source's
labels, read from the V = 4 cache's clean views) is the same for every cache: their clean views are equal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402

SUITES = [study.SUITES["iconshift-" + name] for name in study.VIEW_CACHES]


def collect() -> list[dict]:
    """One entry per (suite, row, budget) that has results: its views, mixing, and mean/std/n of top-1 %."""
    out = []
    for suite in SUITES:
        results = study.load_results(suite)
        for row in suite.rows:
            for budget, epochs in suite.budgets.items():
                vals = [r["top1"] for r in results if r["row"] == row.label and r["budget"] == budget]
                if not vals:
                    continue
                m, s, n = study.summarise(vals)
                runs = [r for r in results if r["row"] == row.label and r["budget"] == budget]
                firsts = [t for t in (study.teacher_top1(r, 0) for r in runs) if t is not None]
                lasts = [t for t in (study.teacher_top1(r, -1) for r in runs) if t is not None]
                out.append({"suite": suite.name, "views": suite.extract["views"], "mix": suite.extract.get("mix", "none"),
                            "method": row.method, "budget": budget, "epochs": epochs, "mean": m, "std": s, "n": n,
                            "seconds": float(np.mean([r["train_seconds"] for r in runs])),
                            "teacher": (study.cell(firsts), study.cell(lasts)) if lasts else ("-", "-")})
    return out


def report(entries: list[dict], ceiling: float | None) -> str:
    pair = study.pair_name(SUITES[0].pairs[0])
    lines = ["# How many views, and mixed views", "",
             f"IconShift-dev {pair}, uda, {SUITES[0].student} from scratch at {SUITES[0].image_size} px; one cache per "
             "row group (views V, mixing), extracted with the same teacher and settings; views drawn without "
             "replacement across epochs. Top-1 % on the target, mean ± std over seeds (n). "
             + (f"Teacher ceiling (linear probe on the source's labels): {ceiling:.1f}. " if ceiling is not None else "")
             + "Reproduce: the commands at the top of `benchmarks/study_views.py`.", "",
             "`customised teacher`: CustomKD's customised classifier on the target, top-1 % at the first phase and "
             "at the last (the same for every seed: the teacher-only chain).", "",
             "| method | views | mixing | budget | top-1 | customised teacher, first / last phase | "
             "train seconds (mean, shared CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in sorted(entries, key=lambda e: (e["method"], e["budget"], e["views"], e["mix"])):
        std = f" ± {e['std']:.1f}" if e["n"] > 1 else ""
        lines.append(f"| {e['method']} | {e['views']} | {e['mix']} | {e['budget']} ({e['epochs']} ep) | "
                     f"{e['mean']:.1f}{std} (n={e['n']}) | {e['teacher'][0]} / {e['teacher'][1]} | {e['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def chart(entries: list[dict], ceiling: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in sorted({e["method"] for e in entries}):
        for mix, style in (("none", "-o"), ("both", "--s")):
            pts = sorted((e["views"], e["mean"], e["std"]) for e in entries
                         if e["method"] == method and e["mix"] == mix and e["budget"] == "long")
            if pts:
                v, m, s = (np.array(x, dtype=float) for x in zip(*pts))
                ax.errorbar(v, m, yerr=np.nan_to_num(s), fmt=style, capsize=3,
                            label=method + ("" if mix == "none" else " (mixed views)"))
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", lw=1, ls=":", label="teacher probe")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("views per image in the cache (V)")
    ax.set_ylabel("target top-1 % (long budget)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    entries = collect()
    if not entries:
        raise SystemExit("no results yet: run the study commands at the top of this file")
    ceiling = None
    if (study.ROOT / SUITES[0].cache).is_dir():
        ceiling = study.teacher_ceiling(SUITES[0], SUITES[0].pairs[0], 0)["probe"] * 100
    text = report(entries, ceiling)
    (study.RESULTS / "study-views.md").write_text(text)
    chart(entries, ceiling, study.RESULTS / "study-views.png")
    print(text)


if __name__ == "__main__":
    main()
