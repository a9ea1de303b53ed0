"""The accuracy study: methods x seeds x datasets x two budgets, from one cache per dataset.

    python benchmarks/study.py --suite demo                 # MNIST SSL (the demo's cache and student)
    python benchmarks/study.py --suite iconshift            # IconShift-dev UDA, three theme pairs
    python benchmarks/study.py --suite demo --jobs 8        # runs in parallel (one process each)
    python benchmarks/study.py --suite demo --report-only   # tables and charts from what has finished

Each run trains through the library (`kdcache.stages.distill.run`) into runs/study/<suite>/<key>/ and leaves
its result in benchmarks/results/study/<suite>/<key>.json. A finished result is never recomputed; a
killed run resumes from its last checkpoint. `--rows` and `--budgets` choose what to run.
Results: benchmarks/results/study-<suite>.md (mean and std over seeds, the teacher's accuracy as the
ceiling, the student/teacher ratio) and study-<suite>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
BEFORE = RESULTS / "sorted-stream"  # results measured on the class-sorted stream, the "before" of each table


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    options: tuple = ()  # method options
    distill: tuple = ()  # DistillConfig overrides
    core: bool = True  # run on every pair; False: on the first pair only (ablations, references)
    scenario: str | None = None  # another scenario (the demo's target oracle: every label)


@dataclass(frozen=True)
class Suite:
    name: str
    cache: str
    scenario: str
    student: str
    image_size: int
    budgets: dict
    pairs: tuple = ((),)  # uda: (source, target) pairs
    labels_per_class: int | None = None
    lr: float = 3e-3
    batch_size: int = 64
    extract: dict = field(default_factory=dict)
    rows: tuple = ()
    pretrained_student: str = "efficientnet_lite0"
    closed_set: bool = False
    setup: str = ""


CORE = (Row("supervised", "supervised"), Row("kd", "kd"), Row("dkd", "dkd"), Row("customkd", "customkd"))
# The rows below were measured before the optimiser's default became timm's parameter groups (no weight decay
# on norm weights and biases); they keep that setting (decay_norm_bias=True) and say so, so that each reproduces
# what was measured. The core rows under that setting stay beside the new ones, on every pair.
PREVIOUS = " [decay on norms and biases]"


def previous_default(row: Row) -> Row:
    return Row(row.label + PREVIOUS, row.method, row.options, row.distill + (("decay_norm_bias", True),),
               row.core, row.scenario)


# CustomKD's default became the moving customisation from 75% of the run (student_weight=1, move_from=0.75,
# refit_threshold=0, anchor, record=clean; README "Past the customised teacher"). The CustomKD rows measured before
# keep the options of the previous default explicitly, so that each reproduces what was measured; a row whose
# customisation was the teacher-only chain says so in its label.
CHAIN = " [teacher-only chain]"
PREVIOUS_CUSTOMKD = (("student_weight", 0.0), ("move_from", 0.0), ("refit_threshold", 0.95), ("anchor", False),
                     ("record", "train"))


def before_moving(row: Row) -> Row:
    """A row measured under CustomKD's previous defaults, with them made explicit."""
    if row.method != "customkd":
        return row
    opts = dict(row.options)
    chain = not opts.get("student_weight", 0)
    reads = not chain or opts.get("w_self", 0) or opts.get("bootstrap", 0)  # the record is read (else: unused)
    # the options of a moving customisation have no effect on the chain (and are refused there)
    unused = {"move_from", "refit_threshold", "anchor"} if chain else set()
    fill = tuple((k, v) for k, v in PREVIOUS_CUSTOMKD if k not in opts and k not in unused and (k != "record" or reads))
    return Row(row.label + (CHAIN if chain else ""), row.method, row.options + fill, row.distill, row.core,
               row.scenario)


ABLATIONS = tuple(previous_default(before_moving(r)) for r in (
    Row("customkd without the task-general term (w_general=0)", "customkd", (("w_general", 0),), core=False),
    Row("customkd w_general=0 + teacher-logit term (w_kd=1)", "customkd", (("w_general", 0), ("w_kd", 1)), core=False),
    Row("customkd w_general=0, one self-training round (first_rounds=1)", "customkd",
        (("w_general", 0), ("first_rounds", 1)), core=False),
    Row("customkd w_general=0, 1 warm-up epoch before customising", "customkd",
        (("w_general", 0), ("warmup_epochs", 1)), core=False),
    Row("kd, teacher head self-trained (--teacher-adapt 3)", "kd", distill=(("teacher_adapt", 3),), core=False),
    Row("pretrained student: supervised", "supervised", distill=(("pretrained", True),), core=False),
    Row("pretrained student: kd", "kd", distill=(("pretrained", True),), core=False),
    Row("pretrained student: customkd", "customkd", distill=(("pretrained", True),), core=False),
))
PREVIOUS_CORE = tuple(previous_default(before_moving(r)) for r in CORE)
CHAIN_CORE = (before_moving(Row("customkd", "customkd")),)  # the previous default, measured beside the other core rows
# CustomKD's self-training term: CE to the confident record of the row's other views (FixMatch's term)
SELF = Row("customkd + self-training term (w_self=1, self_threshold=0.8)", "customkd",
           (("w_self", 1.0), ("self_threshold", 0.8)))
# the customisation moving with the student: refits anchored on the first customisation, mixed with the
# student's record weighted by its confidence
MOVING = Row("customkd + moving customisation (student_weight=0.5, refit_threshold=0, anchor, w_self=0)", "customkd",
             (("student_weight", 0.5), ("refit_threshold", 0.0), ("anchor", True), ("w_self", 0.0)))
# the same, its record taken on the clean view in evaluation mode after each epoch (not at the training steps)
MOVING_CLEAN = Row("customkd + moving customisation on the clean record (student_weight=0.5, refit_threshold=0, "
                   "anchor, record=clean, w_self=0)", "customkd",
                   (("student_weight", 0.5), ("refit_threshold", 0.0), ("anchor", True), ("record", "clean"),
                    ("w_self", 0.0)))
# the customised target of each unlabelled row moved towards the student's clean record (soft bootstrapping),
# on the teacher-only chain, and with the moving customisation as well
BOOT = Row("customkd + bootstrapped target on the clean record (bootstrap=1, record=clean)", "customkd",
           (("bootstrap", 1.0), ("record", "clean")))
BOOT_MOVING = Row("customkd + bootstrapped target and moving customisation on the clean record (bootstrap=1, "
                  "student_weight=0.5, refit_threshold=0, anchor, record=clean)", "customkd",
                  (("bootstrap", 1.0), ("student_weight", 0.5), ("refit_threshold", 0.0), ("anchor", True),
                   ("record", "clean")))
# the student's own: FixMatch's term on the clean record at a lower threshold; information maximisation (confident,
# class-spread predictions on the unlabelled rows of each batch)
SELF_CLEAN = Row("customkd + self-training on the clean record (w_self=1, self_threshold=0.5, record=clean)",
                 "customkd", (("w_self", 1.0), ("self_threshold", 0.5), ("record", "clean")))
IM = Row("customkd + information maximisation (w_im=1)", "customkd", (("w_im", 1.0),))
IM_LOW = Row("customkd + information maximisation (w_im=0.3)", "customkd", (("w_im", 0.3),))
# the temperature of the customised term: softer targets carry more of the teacher's class similarities, sharper
# ones more of its decisions
TEMPS = tuple(Row(f"customkd, customised term at temperature {t} (custom_temperature={t})", "customkd",
                  (("custom_temperature", float(t)),)) for t in (2, 8))
# the moving customisation started late: the teacher-only chain until `move_from` of the run, then refits with the
# student's clean record (taken from two epochs before), when the student has passed the first customisation
LATE = tuple(Row(f"customkd + moving customisation from {int(100 * f)}% of the run on the clean record "
                 f"(student_weight={w}, move_from={f}, refit_threshold=0, anchor, record=clean)", "customkd",
                 (("student_weight", w), ("move_from", f), ("refit_threshold", 0.0), ("anchor", True),
                  ("record", "clean"))) for w, f in ((0.5, 0.75), (1.0, 0.75), (1.0, 0.5)))
# LATE[1] is CustomKD's default (its options spelt out)
CEILING_ROWS = (*CHAIN_CORE, *(before_moving(r) for r in (SELF, MOVING, MOVING_CLEAN, BOOT, BOOT_MOVING, SELF_CLEAN,
                                                          IM, IM_LOW, *TEMPS)), *LATE, Row("kd", "kd"))
# The clean view's share of the training draws (--clean-share; view 0 was drawn 1/V of the time before it was a
# choice): the default 0.25 against half the draws clean
CLEAN_ROWS = tuple(Row(f"{m}, half the draws on the clean view (clean_share=0.5)", m, distill=(("clean_share", 0.5),),
                       core=False) for m in ("kd", "customkd"))
# Past the target (a student better than the customised teacher it learns from): row-level targets (every view of an
# unlabelled row learns the sharpened, balanced ensemble over its cached views), student-side noise (dropout before
# the classifier), an averaged student (EMA of the weights: evaluated, recorded and exported), and a second
# generation (`--from-run`: a new student whose targets mix the first customkd student's clean predictions in).
# "@<row>" in a row's --from-run names that row's run of the same pair, budget and seed.
FIRST = "customkd"
GENERATION_ROWS = (
    Row("customkd, row-level targets (target=row)", "customkd", (("target", "row"),), core=False),
    Row("customkd, row-level targets + student dropout (target=row, --drop-rate 0.2)", "customkd",
        (("target", "row"),), (("drop_rate", 0.2),), core=False),
    Row("customkd + averaged student (--ema 0.99)", "customkd", distill=(("ema", 0.99),), core=False),
    Row("customkd, row-level targets + dropout + averaged student (target=row, --drop-rate 0.2, --ema 0.99)",
        "customkd", (("target", "row"),), (("drop_rate", 0.2), ("ema", 0.99)), core=False),
    Row("customkd, second generation (--from-run the customkd student, --from-run-weight 0.5)", "customkd",
        distill=(("from_run", "@" + FIRST), ("from_run_weight", 0.5)), core=False),
)
ORACLE = previous_default(Row("target oracle (every train label)", "supervised", core=False, scenario="supervised"))

SUITES = {
    "demo": Suite("demo", "cache/demo-mnist5k", "ssl", "mobilenetv3_small_050", 32, {"short": 8, "long": 32},
                  labels_per_class=10,
                  rows=CORE + CHAIN_CORE + PREVIOUS_CORE + ABLATIONS + (ORACLE,) + CLEAN_ROWS + GENERATION_ROWS,
                  setup="python cli.py demo (or its extract step) builds the cache"),
    "iconshift": Suite("iconshift", "cache/iconshift-lite2", "uda", "mobilenetv3_small_100", 64,
                       {"short": 10, "long": 40},
                       pairs=(("faenza", "tango"), ("breeze", "papirus"), ("mint-y", "breeze")), closed_set=True,
                       rows=CORE + CHAIN_CORE + PREVIOUS_CORE + ABLATIONS + CLEAN_ROWS + GENERATION_ROWS,
                       setup="bash ../shared/iconshift/build.sh data/iconshift-dev; "
                             "bash ../shared/weights/get_teacher.sh weights; python cli.py extract --dataset imagefolder "
                             "--data-root data/iconshift-dev --domain tango --domain faenza --domain papirus "
                             "--domain paper --domain mint-y --domain breeze --teacher efficientnet_lite2 "
                             "--teacher-weights weights/efficientnet_lite2.safetensors --teacher-input-size 128 "
                             "--views 4 --head none --out cache/iconshift-lite2"),
}
# The customised teacher's ceiling (does the student pass it?): CustomKD's default (the teacher-only chain) against
# its self-training term and the moving customisation, from caches extracted on this machine, every customised row with its teacher's
# curve. Results in study-<name>.md beside the main suites'.
for _name in ("demo", "iconshift"):
    _s = SUITES[_name]
    SUITES[_name + "-ceiling"] = Suite(_name + "-ceiling", _s.cache, _s.scenario, _s.student, _s.image_size, _s.budgets,
                                       _s.pairs, _s.labels_per_class, _s.lr, _s.batch_size, _s.extract, CEILING_ROWS,
                                       _s.pretrained_student, _s.closed_set, _s.setup)

# How many views, and mixed views: kd and customkd from caches of V views (every pair; the online reference on the
# first), each cache extracted with the IconShift-dev settings and its own (`python benchmarks/study_views.py`
# reports them together in study-views.md).
VIEWS_ROWS = (Row("kd", "kd"), *CHAIN_CORE)
# The reference a cache of V views is measured against: the teacher online on views drawn anew every epoch
# (`--online-teacher --online-views fresh`), with the cache's view policy; run from the V = 4 cache.
ONLINE = (("online_teacher", True), ("online_views", "fresh"))
ONLINE_ROWS = (Row("kd, online teacher on fresh views", "kd", distill=ONLINE, core=False),
               before_moving(Row("customkd, online teacher on fresh views", "customkd", distill=ONLINE, core=False)))
VIEW_CACHES = {"views4": {"views": 4}, "views4-mix": {"views": 4, "mix": "both"}, "views16": {"views": 16},
               "views16-mix": {"views": 16, "mix": "both"}}
for _name, _extract in VIEW_CACHES.items():
    _s = SUITES["iconshift"]
    _cache = "cache/iconshift-lite2" if _name == "views4" else f"cache/iconshift-lite2-{_name}"
    SUITES["iconshift-" + _name] = Suite("iconshift-" + _name, _cache, _s.scenario, _s.student, _s.image_size,
                                         _s.budgets, _s.pairs, _s.labels_per_class, _s.lr, _s.batch_size, _extract,
                                         VIEWS_ROWS + (ONLINE_ROWS if _name == "views4" else ()),
                                         _s.pretrained_student, _s.closed_set,
                                         _s.setup + f" (with --views {_extract['views']}"
                                         + (f" --mix {_extract['mix']}" if "mix" in _extract else "") + ")")

# The same on the demo (MNIST, ssl): the demo's own cache (V = 3), and V = 16 plain and mixed, extracted with the
# demo's settings.
DEMO_VIEW_CACHES = {"views3": {}, "views16": {"views": 16}, "views16-mix": {"views": 16, "mix": "both"}}
for _name, _extract in DEMO_VIEW_CACHES.items():
    _s = SUITES["demo"]
    _cache = _s.cache if _name == "views3" else f"{_s.cache}-{_name}"
    SUITES["demo-" + _name] = replace(_s, name="demo-" + _name, cache=_cache, extract=_extract, rows=VIEWS_ROWS,
                                      setup="--prepare builds it: the demo's extraction settings"
                                      + (f" with --views {_extract['views']}" if "views" in _extract else "")
                                      + (f" --mix {_extract['mix']}" if "mix" in _extract else ""))

# Patience: CustomKD's default at 120 epochs on faenza->tango (does its student pass its own customised teacher
# given three times the long budget?); its results in study-iconshift-patient.md.
SUITES["iconshift-patient"] = replace(SUITES["iconshift"], name="iconshift-patient", budgets={"long": 120},
                                      pairs=(("faenza", "tango"),), rows=(Row("customkd", "customkd"),))

# Sparse against dense logits: two caches of faenza and tango with a probe head fitted on faenza's labels alone (so
# the faenza->tango runs read the cached logits rather than refitting a head), dense float16 and top-10.
LOGITS_ROWS = (Row("kd", "kd"), Row("dkd", "dkd"), *CHAIN_CORE)
LOGIT_CACHES = {"dense": {"logits_topk": 0}, "top10": {"logits_topk": 10}}
for _name, _extract in LOGIT_CACHES.items():
    _s = SUITES["iconshift"]
    _extract = {"domains": ("faenza", "tango"), "head": "probe", "probe_domains": ("faenza",), **_extract}
    SUITES["iconshift-logits-" + _name] = Suite(
        "iconshift-logits-" + _name, f"cache/iconshift-lite2-probe-{_name}", _s.scenario, _s.student, _s.image_size,
        _s.budgets, (("faenza", "tango"),), _s.labels_per_class, _s.lr, _s.batch_size, _extract, LOGITS_ROWS,
        _s.pretrained_student, _s.closed_set,
        _s.setup.replace("--domain tango --domain faenza --domain papirus --domain paper --domain mint-y --domain breeze",
                         "--domain faenza --domain tango").replace("--head none", "--head probe --probe-domain faenza")
        .replace("cache/iconshift-lite2", f"cache/iconshift-lite2-probe-{_name}")
        + (f" --logits-topk {_extract['logits_topk']}" if "logits_topk" in _extract else ""))

ICON_DOMAINS = ("tango", "faenza", "papirus", "paper", "mint-y", "breeze")
SHARED = ROOT.parent / "shared"


def ensure_cache(suite: Suite) -> None:
    """Build the suite's cache if it is missing (resumable: extraction resumes shard by shard)."""
    from kdcache.stages import demo, extract

    if suite.name.startswith("demo"):
        cfg = demo.DemoConfig()
        settings = dict(dataset="mnist5k", teacher=cfg.teacher, teacher_weights=demo.lite0_weights(),
                        teacher_input_size=cfg.teacher_input_size, views=cfg.views, view_policy="noflip", head="probe",
                        batch_size=256, workers=1, shard_size=1024, out=str(ROOT / suite.cache), progress=False)
        extract.run(extract.ExtractConfig(**{**settings, **suite.extract}))
        return
    data, weights = ROOT / "data" / "iconshift-dev", ROOT / "weights"
    env = dict(os.environ, PYTHON=sys.executable)
    if not (data / "manifest.json").is_file():
        subprocess.run(["bash", str(SHARED / "iconshift" / "build.sh"), str(data)], check=True, env=env)
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        if not (weights / f"{name}.safetensors").is_file():
            subprocess.run(["bash", str(SHARED / "weights" / "get_teacher.sh"), str(weights)], check=True, env=env)
            break
    settings = dict(dataset="imagefolder", data_root=str(data), domains=ICON_DOMAINS, teacher="efficientnet_lite2",
                    teacher_weights=str(weights / "efficientnet_lite2.safetensors"), teacher_input_size=128, views=4,
                    head="none", batch_size=128, workers=1, shard_size=512, out=str(ROOT / suite.cache),
                    progress=False)
    extract.run(extract.ExtractConfig(**{**settings, **suite.extract}))  # the suite's own settings win


def pair_name(pair: tuple) -> str:
    return f"{pair[0]}->{pair[1]}" if pair else "all"


def run_key(suite: Suite, pair: tuple, budget: str, row: Row, seed: int) -> str:
    label = "".join(c if c.isalnum() or c in "-=." else "_" for c in row.label)[:120]
    p = f"{pair[0]}-{pair[1]}" if pair else "all"
    return f"{p}__{budget}__{label}__s{seed}"


def plan(suite: Suite, budgets: list[str], seeds: int, rows: list[str] | None, every_pair: bool = False) -> list[tuple]:
    """Runs to do; a row that is not a core row runs on the first pair only, unless `every_pair`."""
    out = []
    for budget in budgets:
        for i, pair in enumerate(suite.pairs):
            for row in suite.rows:
                if rows and row.label not in rows:
                    continue
                if not row.core and i > 0 and not every_pair:
                    continue
                for seed in range(seeds):
                    out.append((pair, budget, row, seed))
    return out


def pretrained_weights(suite: Suite) -> str:
    """ImageNet EfficientNet-Lite0 in timm's names (`bash ../shared/weights/get_teacher.sh weights`)."""
    path = Path(os.environ.get("STUDY_PRETRAINED") or ROOT / "weights" / f"{suite.pretrained_student}.safetensors")
    if not path.is_file():
        raise SystemExit(f"{path} is missing: bash ../shared/weights/get_teacher.sh weights")
    return str(path)


def run_config(suite: Suite, pair: tuple, budget: str, row: Row, seed: int, device: str, workers: int):
    """The DistillConfig of one run."""
    from kdcache.stages import distill

    key = run_key(suite, pair, budget, row, seed)
    overrides = dict(row.distill)
    first = overrides.get("from_run")
    if isinstance(first, str) and first.startswith("@"):  # another row's run of this pair, budget and seed
        found = [r for r in suite.rows if r.label == first[1:]]
        path = ROOT / "runs" / "study" / suite.name / run_key(suite, pair, budget, found[0], seed)
        if not (path / "summary.json").is_file():
            raise SystemExit(f"{key}: its first generation {path} has not finished; run row {first[1:]!r} first")
        overrides["from_run"] = str(path)
    student, weights = suite.student, None
    if overrides.pop("pretrained", False):
        student, weights = suite.pretrained_student, pretrained_weights(suite)
    scenario = row.scenario or suite.scenario
    return distill.DistillConfig(
        cache=str(ROOT / suite.cache), student=student, student_weights=weights, method=row.method,
        method_options=row.options, scenario=scenario, source=pair[:1], target=pair[1:],
        labels_per_class=suite.labels_per_class if scenario == "ssl" else None,
        closed_set=suite.closed_set and scenario == "uda",
        epochs=suite.budgets[budget], batch_size=suite.batch_size, lr=suite.lr, image_size=suite.image_size,
        workers=workers, seed=seed, device=device, out=str(ROOT / "runs" / "study" / suite.name / key), resume=True,
        eval_every=1 if has_teacher_curve(row) else suite.budgets[budget], progress=False, check_dataset=False,
        **overrides)


def has_teacher_curve(row: Row) -> bool:
    """Rows whose teacher is customised (customkd) or adapted (--teacher-adapt): their runs evaluate the
    student every epoch, so its curve is reported beside that teacher's."""
    return row.method == "customkd" or dict(row.distill).get("teacher_adapt", 0) > 0


def train(suite: Suite, pair: tuple, budget: str, row: Row, seed: int, device: str, workers: int) -> dict:
    """One run through the library; returns its result record."""
    import torch

    from kdcache.stages import distill

    torch.set_num_threads(max(1, int(os.environ.get("STUDY_THREADS", "1"))))
    key = run_key(suite, pair, budget, row, seed)
    cfg = run_config(suite, pair, budget, row, seed, device, workers)
    student = cfg.student
    start = time.perf_counter()
    out = distill.run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    head = json.loads((out / "summary.json").read_text())["head"]
    return {"key": key, "suite": suite.name, "pair": pair_name(pair), "budget": budget, "epochs": cfg.epochs,
            "row": row.label, "method": row.method, "options": [list(o) for o in row.options],
            "seed": seed, "top1": last["eval"]["top1"], "student": student,
            "custom": {k: v for k, v in last.items() if k.startswith("custom")},
            "curve": curve(records, head) if has_teacher_curve(row) else None,
            "train_seconds": sum(r["seconds"] + r.get("custom_seconds", 0.0) for r in records),
            "seconds": time.perf_counter() - start, "device": device}


CURVE_KEYS = ("custom_teacher_eval_top1", "custom_target_eval_top1", "student_record_eval_top1",
              "student_record_confident", "row_target_top1", "previous_student_top1")


def curve(records: list[dict], head: dict) -> list[dict]:
    """Per epoch: the student's evaluation top-1 and its teacher's (the customised classifier of that epoch,
    or the adapted head, which stays fixed)."""
    out = []
    for r in records:
        point = {"epoch": r["epoch"], "top1": r.get("eval", {}).get("top1")}
        if "eval_trained" in r:  # an averaged student's run: the trained weights beside it
            point["top1_trained"] = r["eval_trained"].get("top1")
        point.update({k: r[k] for k in CURVE_KEYS if k in r})
        if head.get("adapted"):
            point["teacher_eval_top1"] = head["eval_top1_after"]
        out.append(point)
    return out


def teacher_ceiling(suite: Suite, pair: tuple, seed: int) -> dict:
    """The teacher's top-1 on the evaluation rows: a probe on the scenario's labels, and self-trained."""
    from kdcache.scenario_heads import scenario_teacher_head, teacher_adaptation, teacher_logits
    from kdcache.scenarios import make_scenario
    from kdcache.cache.store import CacheStore

    store = CacheStore.open(ROOT / suite.cache, mode="r+")
    sc = make_scenario(suite.scenario, store.array("labels")[:], store.array("domains")[:],
                       store.array("splits")[:], store.status(), list(store.meta.domains), pair[:1],
                       pair[1:], suite.labels_per_class, seed, suite.closed_set)
    head, info = scenario_teacher_head(store, sc)
    labels = store.array("labels")[:]
    z = teacher_logits(store, head, sc.evaluation, view=0)
    _, adapted = teacher_adaptation(store, sc, head, info, 3)
    return {"probe": float((z.argmax(1) == labels[sc.evaluation]).mean()),
            "self_trained": adapted["eval_top1_after"]}


def result_path(suite: Suite, key: str) -> Path:
    return RESULTS / "study" / suite.name / f"{key}.json"


def run_all(suite: Suite, todo: list[tuple], jobs: int, device: str, workers: int, precompute: bool = True) -> None:
    pending = [t for t in todo if not result_path(suite, run_key(suite, *t)).is_file()]
    print(f"[study {suite.name}] {len(todo) - len(pending)} of {len(todo)} runs already done; {len(pending)} to run "
          f"with {jobs} job(s)", file=sys.stderr)
    running: list[tuple[subprocess.Popen, str]] = []
    start = time.perf_counter()
    if jobs > 1 and precompute:
        prepare_shared(suite, pending, device, workers)
    try:
        _drain(suite, pending, running, jobs, device, workers, start)
    except KeyboardInterrupt:  # stop: the runs in flight keep their checkpoints and resume next time
        for proc, _ in running:
            proc.terminate()
        raise SystemExit(f"[study {suite.name}] interrupted; re-run the same command to continue")


def prepare_shared(suite: Suite, pending: list, device: str, workers: int) -> None:
    """Derived data the runs share (teacher heads, CustomKD's customisation phases), computed once here
    before the runs start, instead of by every run at once on a shared device."""
    from kdcache.stages import distill

    seen = set()
    for pair, budget, row, seed in sorted(pending, key=lambda t: -suite.budgets[t[1]]):
        cfg = run_config(suite, pair, budget, row, seed, device, workers)
        what = (cfg.method, cfg.method_options, cfg.scenario, cfg.source, cfg.target, cfg.seed, cfg.teacher_adapt)
        if what in seen:
            continue
        seen.add(what)
        t0 = time.perf_counter()
        distill.precompute(cfg)
        print(f"[study {suite.name}] derived data of {pair_name(pair)} seed {seed} {row.method} {dict(row.options)} "
              f"ready ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def _drain(suite: Suite, pending: list, running: list, jobs: int, device: str, workers: int, start: float) -> None:
    done = 0
    while pending or running:
        while pending and len(running) < jobs:
            pair, budget, row, seed = pending.pop(0)
            key = run_key(suite, pair, budget, row, seed)
            cmd = [sys.executable, __file__, "--suite", suite.name, "--one", key, "--device", device,
                   "--workers", str(workers)]
            log = open(RESULTS / "study" / suite.name / f".{key}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), key))
        time.sleep(0.5)
        for proc, key in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, key))
            done += 1
            ok = result_path(suite, key).is_file()
            print(f"[study {suite.name}] {done}/{done + len(pending) + len(running)} {key}: "
                  f"{'ok' if ok else 'FAILED (exit %d), see .%s.log' % (proc.returncode, key)} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def run_one(suite: Suite, key: str, device: str, workers: int) -> None:
    for t in plan(suite, list(suite.budgets), 99, None, every_pair=True):
        if run_key(suite, *t) == key:
            record = train(suite, *t, device=device, workers=workers)
            path = result_path(suite, key)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)
            return
    raise SystemExit(f"unknown run key {key}")


# ----------------------------------------------------------------------------- report


def load_results(suite: Suite, before: bool = False) -> list[dict]:
    """The suite's results on the fair stream; `before`: those measured on the class-sorted stream, kept in
    benchmarks/results/sorted-stream/ (see its README)."""
    folder = (BEFORE if before else RESULTS) / "study" / suite.name
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def summarise(values: list[float]) -> tuple[float, float, int]:
    a = np.asarray(values, dtype=float) * 100
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan"), len(a)


def report(suite: Suite, seeds: int) -> str:
    results, before = load_results(suite), load_results(suite, before=True)
    ceilings = {}
    for pair in suite.pairs:
        per_seed = [teacher_ceiling(suite, pair, s) for s in range(seeds if suite.scenario == "ssl" else 1)]
        ceilings[pair_name(pair)] = {k: summarise([c[k] for c in per_seed]) for k in per_seed[0]}
    lines = [f"# Accuracy study: {suite.name}", "",
             f"Scenario {suite.scenario}; student {suite.student} from scratch at {suite.image_size} px (pretrained rows: "
             f"{suite.pretrained_student}, ImageNet weights); batch {suite.batch_size}, AdamW lr {suite.lr} (no weight decay on norms and biases unless the row says otherwise); "
             f"budgets {', '.join(f'{b} = {e} epochs' for b, e in suite.budgets.items())}; cache `{suite.cache}`. "
             "Top-1 % on the evaluation rows, mean ± std over seeds (n = seeds); `ratio` = student / teacher probe; "
             "`sorted stream` = the same row measured before every batch was a fair sample (class-sorted batches, "
             "benchmarks/results/sorted-stream/). "
             f"Reproduce: `python benchmarks/study.py --suite {suite.name}` ({suite.setup}).", ""]
    for pair in suite.pairs:
        name = pair_name(pair)
        c = ceilings[name]
        lines += [f"## {name}", "",
                  f"Teacher ceiling: linear probe on the labelled rows {c['probe'][0]:.1f}"
                  + (f" ± {c['probe'][1]:.1f}" if c['probe'][2] > 1 else "")
                  + f"; self-trained on the unlabelled rows' cached features (3 rounds) {c['self_trained'][0]:.1f}"
                  + (f" ± {c['self_trained'][1]:.1f}" if c['self_trained'][2] > 1 else "") + ".", "",
                  "| row | " + " | ".join(f"{b} ({e} ep) top-1 | ratio | sorted stream" for b, e in suite.budgets.items())
                  + " |", "| --- |" + " --- | --- | --- |" * len(suite.budgets)]
        for row in suite.rows:
            cells = []
            for budget in suite.budgets:
                vals = [r["top1"] for r in results if r["pair"] == name and r["budget"] == budget
                        and r["row"] == row.label]
                old = [r["top1"] for r in before if r["pair"] == name and r["budget"] == budget
                       and r["row"] == row.label]
                if not vals:
                    cells += ["", "", cell(old) if old else ""]
                    continue
                m, s, n = summarise(vals)
                cells += [f"{m:.1f} ± {s:.1f} (n={n})", f"{m / c['probe'][0]:.2f}", cell(old) if old else ""]
            if any(cells[i] for i in range(0, len(cells), 3)):
                lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        lines += teacher_table(suite, results, name)
        devices = {b: sorted({r["device"] for r in results if r["pair"] == name and r["budget"] == b})
                   for b in suite.budgets}
        lines += ["", "Devices: " + "; ".join(f"{b} {', '.join(d) or '-'}" for b, d in devices.items())
                  + " (cuda: bf16 autocast; cpu: float32)."]
        lines.append("")
    lines += verdict(suite, results)
    return "\n".join(lines)


def teacher_top1(r: dict, which: int) -> float | None:
    """The run's customised (or adapted) teacher's evaluation top-1 at its first (0) or last (-1) epoch that
    has one; None where the run did not record it (the first only in runs with a per-epoch curve)."""
    points = [p.get("custom_teacher_eval_top1", p.get("teacher_eval_top1")) for p in (r.get("curve") or [])]
    points = [p for p in points if p is not None]
    if points:
        return points[which]
    return r.get("custom", {}).get("custom_teacher_eval_top1") if which == -1 else None


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    m, s, n = summarise(values)
    return f"{m:.1f}" + (f" ± {s:.1f}" if n > 1 else "") + f" (n={n})"


def teacher_table(suite: Suite, results: list[dict], name: str) -> list[str]:
    """Each row with a customised or adapted teacher: that teacher's evaluation top-1 at the first and the
    last epoch beside the student's, and the student's margin over the first."""
    out = []
    for row in suite.rows:
        for budget in suite.budgets:
            runs = [r for r in results if r["pair"] == name and r["budget"] == budget and r["row"] == row.label]
            firsts = [teacher_top1(r, 0) for r in runs]
            lasts = [teacher_top1(r, -1) for r in runs]
            if not runs or all(x is None for x in lasts):
                continue
            margin = [r["top1"] - f for r, f in zip(runs, firsts) if f is not None]
            beyond = [r["top1"] - x for r, x in zip(runs, lasts) if x is not None]
            out.append(f"| {row.label} | {budget} ({suite.budgets[budget]} ep) | {cell([r['top1'] for r in runs])} | "
                       f"{cell([f for f in firsts if f is not None])} | {cell([x for x in lasts if x is not None])} | "
                       f"{cell(margin)} | {cell(beyond)} |")
    if not out:
        return []
    return ["", "The customised (or adapted) teacher on the evaluation rows, top-1 %: at the first epoch's "
            "customisation and at the last; the student's margin over each, per seed (- : not recorded "
            "by those runs).", "",
            "| row | budget | student | teacher, first epoch | teacher, last epoch | student − first | student − last |",
            "| --- | --- | --- | --- | --- | --- | --- |", *out]


def verdict(suite: Suite, results: list[dict]) -> list[str]:
    """customkd against the best of kd and dkd: a win needs a margin above the larger of their stds."""
    out = ["## CustomKD against the best of kd and dkd", ""]
    for budget in suite.budgets:
        for pair in suite.pairs:
            name = pair_name(pair)
            stats, named = {}, {}
            # customkd: its default, or where that was not measured, the previous default (the teacher-only chain)
            for key, labels in (("kd", ("kd",)), ("dkd", ("dkd",)), ("customkd", ("customkd", "customkd" + CHAIN)),
                                ("supervised", ("supervised",))):
                for label in labels:
                    vals = [r["top1"] for r in results if r["pair"] == name and r["budget"] == budget
                            and r["row"] == label]
                    if len(vals) >= 2:
                        stats[key], named[key] = summarise(vals), label
                        break
            if not {"kd", "dkd", "customkd"} <= set(stats):
                continue
            best = max(("kd", "dkd"), key=lambda k: stats[k][0])
            margin = stats["customkd"][0] - stats[best][0]
            need = max(stats["kd"][1], stats["dkd"][1])
            word = "wins" if margin > need else ("ties" if margin > -need else "loses")
            kd_sup = ("supervised not measured" if "supervised" not in stats else "kd beats supervised"
                      if stats["kd"][0] > stats["supervised"][0] else "kd does not beat supervised")
            out.append(f"- {name}, {budget}: {named['customkd']} {stats['customkd'][0]:.1f} vs {best} "
                       f"{stats[best][0]:.1f}: "
                       f"margin {margin:+.1f}, needed > {need:.1f}: **{word}**; {kd_sup}.")
    return out + [""]


def chart(suite: Suite, path: Path) -> None:
    """Bars: the core rows at both budgets. Below, for the long budget, per pair: the student's top-1 per
    epoch beside its customised or adapted teacher's (mean over seeds), for every row that records both.
    One colour per row in every panel, and one legend under them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(suite)
    measured = {r["row"] for r in results}
    labels = [row.label for row in suite.rows if row.label in measured]
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    groups = [(pair_name(p), b) for b in suite.budgets for p in suite.pairs]
    fig = plt.figure(figsize=(max(6, 1.6 * len(groups)), 7.6 + 0.16 * len(labels)))
    handles = bars(fig.add_subplot(2, 1, 1), suite, results, groups, colours)
    long = list(suite.budgets)[-1]
    for i, pair in enumerate(suite.pairs):
        handles.update(curves(fig.add_subplot(2, len(suite.pairs), len(suite.pairs) + i + 1), suite, results,
                              pair_name(pair), long, colours))
    order = [label for label in labels if label in handles]
    legend_height = (0.16 * len(order) + 0.3) / fig.get_figheight()
    fig.legend([handles[k] for k in order], order, loc="lower center", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(ax, suite: Suite, results: list[dict], groups: list[tuple], colours: dict) -> dict:
    """The core rows' bars; returns {row label: legend handle} of the rows drawn."""
    rows = [r.label for r in suite.rows if r.core]
    width = 0.8 / len(rows)
    handles = {}
    for i, label in enumerate(rows):
        means, stds = [], []
        for name, budget in groups:
            vals = [r["top1"] for r in results if r["pair"] == name and r["budget"] == budget and r["row"] == label]
            m, s, _ = summarise(vals) if vals else (np.nan, np.nan, 0)
            means.append(m)
            stds.append(0 if np.isnan(s) else s)
        if label in colours:
            handles[label] = ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, capsize=2,
                                    color=colours[label])
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{n}\n{b} ({suite.budgets[b]} ep)" for n, b in groups], fontsize=8)
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{suite.name}: mean ± std over seeds")
    return handles


def curves(ax, suite: Suite, results: list[dict], name: str, budget: str, colours: dict) -> dict:
    """Student (solid) and its teacher (dashed) per epoch, mean over seeds, one colour per row; returns
    {row label: legend handle} of the rows drawn."""
    handles = {}
    for row in suite.rows:
        runs = [r for r in results if r["pair"] == name and r["budget"] == budget and r["row"] == row.label
                and r.get("curve")]
        if not runs:
            continue
        epochs = np.arange(1, suite.budgets[budget] + 1)

        def mean(key):
            a = np.array([[np.nan if p.get(key) is None else p[key] for p in r["curve"]] for r in runs], float)
            return np.nanmean(a, 0) * 100 if np.isfinite(a).any() else None

        student = mean("top1")
        teacher = mean("custom_teacher_eval_top1")
        teacher = teacher if teacher is not None else mean("teacher_eval_top1")
        colour = colours.get(row.label)
        handles[row.label], = ax.plot(epochs[:len(student)], student, lw=1.2, color=colour)
        if teacher is not None:
            ax.plot(epochs[:len(teacher)], teacher, lw=1.0, ls="--", color=colour)
        rows = mean("row_target_top1")  # target=row: the row-level targets' own top-1
        if rows is not None:
            ax.plot(epochs[:len(rows)], rows, lw=1.0, ls=":", color=colour)
    ax.set_title(f"{name}, {budget}\nstudent (—), teacher (--), row targets (··)", fontsize=7)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("top-1 %", fontsize=8)
    ax.tick_params(labelsize=7)
    return handles


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--budgets", nargs="+", default=None, help="short, long (default both)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=None, help="row labels (default every row; the core rows are named by their method)")
    ap.add_argument("--core", action="store_true", help="only the core rows (supervised, kd, dkd, customkd)")
    ap.add_argument("--pairs", nargs="+", default=None, help="uda pairs to run, e.g. faenza-tango (default every pair)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    ap.add_argument("--every-pair", action="store_true", help="run the chosen ablation rows on every pair too")
    ap.add_argument("--no-precompute", action="store_true",
                    help="let the runs compute shared derived data themselves (under a lock) instead of first")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="run only; write the tables later (--report-only)")
    ap.add_argument("--prepare", action="store_true", help="build (or finish) the suite's cache, then run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    suite = SUITES[a.suite]
    if a.seeds < 3 and not a.one:
        print("warning: fewer than 3 seeds: the study's claims need >= 3", file=sys.stderr)
    budgets = a.budgets or list(suite.budgets)
    bad = [b for b in budgets if b not in suite.budgets]
    if bad:
        ap.error(f"--budgets {bad}: choose from {list(suite.budgets)}")
    if a.prepare or not (ROOT / suite.cache).is_dir():
        if a.one or a.report_only:
            ap.error(f"cache {suite.cache} is missing: {suite.setup}")
        ensure_cache(suite)
    (RESULTS / "study" / suite.name).mkdir(parents=True, exist_ok=True)
    if a.one:
        run_one(suite, a.one, a.device, a.workers)
        return
    if not a.report_only:
        rows = [r.label for r in CORE] if a.core else a.rows
        todo = plan(suite, budgets, a.seeds, rows, a.every_pair)
        if a.pairs:
            names = {f"{p[0]}-{p[1]}" for p in suite.pairs if p}
            if not set(a.pairs) <= names:
                ap.error(f"--pairs {sorted(set(a.pairs) - names)}: choose from {sorted(names)}")
            todo = [t for t in todo if t[0] and f"{t[0][0]}-{t[0][1]}" in a.pairs]
        run_all(suite, todo, a.jobs, a.device, a.workers, precompute=not a.no_precompute)
    if a.no_report:
        return
    text = report(suite, a.seeds)
    (RESULTS / f"study-{suite.name}.md").write_text(text + "\n")
    chart(suite, RESULTS / f"study-{suite.name}.png")
    print(text)


if __name__ == "__main__":
    main()
