"""The typed options of each stage: one dataclass per stage, torch-free so the command line can read
it at once. Its field names are the YAML keys and (with - for _) the flags; `kdcache <stage> --help`
shows these defaults; `config.resolve` types and checks values (defaults < YAML < flags)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_METHOD = "customkd"

# the kinds of the list options (config.coerce checks them): Names, a list of names (a repeated flag);
# Pairs, (key, value) pairs (a repeated KEY=VALUE flag, a mapping in YAML)
Names = tuple
Pairs = tuple

# every integer option is a count, a size or an index: none is negative, none needs more than 31 bits;
# a seed may use 32 (what numpy's and torch's seeding both accept)
INT_RANGE = (0, 2**31 - 1)
INT_LIMITS = {"seed": (0, 2**32 - 1), "view_seed": (0, 2**32 - 1)}

# repeated or negated flags and the schema field (YAML key) each one sets
FLAG_FIELDS = {"dataset_opt": "dataset_options", "domain": "domains", "method_opt": "method_options",
               "no_progress": "progress", "no_check_dataset": "check_dataset", "no_onnx": "onnx"}


@dataclass(frozen=True)
class ExtractConfig:
    dataset: str | None = None  # required: a layout name (synthetic: generated test images)
    data_root: str | None = None
    dataset_options: Pairs = ()  # (key, value) pairs, e.g. (("n", 512),) for synthetic
    domains: Names = ()  # restrict to these domains (empty: all)
    teacher: str = "vit_large_patch14_dinov2.lvd142m"
    teacher_weights: str | None = None
    teacher_input_size: int | None = None  # default: the model's own
    random_init: bool = False
    feature: str = "auto"  # open_clip: pre_projection (default) or embedding
    views: int = 4
    view_policy: str = "default"
    view_seed: int = 0
    tokens: int = 0  # G: cache patch tokens pooled to a GxG grid (0: none)
    head: str = "auto"
    batch_size: int = 64
    workers: int = 4
    shard_size: int = 1024
    image_bound: int = 384
    compression: str = "zstd"
    feature_dtype: str = "float16"  # or int8: a quarter of the bytes less for features and tokens
    device: str = "auto"
    decode: str = "workers"  # where views are decoded and replayed: workers (the loader) or device (nvJPEG on a GPU)
    channels_last: bool = False  # the teacher's convolutions in channels-last memory format
    compile: str = "off"  # torch.compile the teacher: off, default, reduce-overhead (CUDA graphs), max-autotune
    out: str | None = None
    overwrite: bool = False
    repair: bool = False  # re-check every done shard against its checksum and recompute damaged ones
    part: str | None = None  # i/N, auto/N or auto: a job-array task's share of the shards (None: all)
    progress: bool = True


@dataclass(frozen=True)
class DistillConfig:
    cache: str = "cache/synthetic"
    student: str = "mobilenetv3_large_100"
    student_weights: str | None = None
    method: str = DEFAULT_METHOD
    method_options: Pairs = ()  # (key, value) pairs, e.g. (("temperature", 2.0),)
    scenario: str = "supervised"
    source: Names = ()
    target: Names = ()
    closed_set: bool = False  # uda: only target rows of the source's classes (a closed-set benchmark)
    labels_per_class: int | None = None
    labelled_ratio: float = 0.25  # at least this fraction of each epoch is labelled (0: natural mix)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    decay_norm_bias: bool = False  # True: weight decay on norm weights and biases too (False: timm's groups)
    warmup_epochs: float = 1.0
    online_teacher: bool = False  # run the teacher on the replayed views instead of reading the cache
    teacher_weights: str | None = None  # online teacher: weights (default: the file the cache was made from)
    teacher_adapt: int = 0  # rounds of self-training of the teacher head on the unlabelled rows (0: off)
    image_size: int | None = None  # default: the student's own input size
    shuffle_buffer: int = 512
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    check_dataset: bool = True
    eval_every: int = 1
    progress: bool = True
    tensorboard: bool = False  # also log epoch metrics to <run>/tensorboard (needs the tensorboard package)


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = ""
    batch_size: int = 256
    workers: int = 2
    latency_repeats: int = 50
    latency_threads: int = 1  # CPU threads for the latency measurement (fixed, so figures compare)
    latency_batch: int = 8  # a second latency figure at this batch size (0: batch 1 only)
    onnx: bool = True
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class DemoConfig:
    cache: str = "cache/demo-mnist5k"
    runs: str = "runs"
    teacher: str = "efficientnet_lite0"
    teacher_input_size: int = 64
    views: int = 3
    student: str = "mobilenetv3_small_050"
    image_size: int = 32
    labels_per_class: int = 10
    methods: Names = ("supervised", "kd", "customkd")
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    workers: int = 1
    seed: int = 0
    progress: bool = True
