# kdcache: every target creates .venv on first use (make setup).
PY      := .venv/bin/python
STAMP   := .venv/.installed

DATASET ?= synthetic
DATA_ROOT ?= data/$(DATASET)
TEACHER ?= vit_large_patch14_dinov2.lvd142m
OUT     ?= cache/$(DATASET)
VIEWS   ?= 4
TOKENS  ?= 0
WEIGHTS ?=
HEAD    ?= auto
BATCH   ?= 64
WORKERS ?= 4
EXTRA   ?=
CACHE   ?= cache/$(DATASET)
STUDENT ?= mobilenetv3_large_100
METHOD  ?= customkd
SCENARIO ?= supervised
EPOCHS  ?= 10

.PHONY: setup test test-slow test-all test-faults demo extract info distill evaluate report bench bench-gpu bench-quick fuzz study clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the slow tests, and every generated-case (hypothesis) test with many more cases
test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q -m 'slow or hypothesis'

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

test-faults: $(STAMP)
	$(PY) -m pytest -q -s -m faults tests/test_faults.py

extract: $(STAMP)
	$(PY) cli.py extract --dataset $(DATASET) --data-root $(DATA_ROOT) --teacher $(TEACHER) \
	  --out $(OUT) --views $(VIEWS) --tokens $(TOKENS) --head $(HEAD) --batch-size $(BATCH) \
	  --workers $(WORKERS) $(if $(WEIGHTS),--teacher-weights $(WEIGHTS)) $(EXTRA)

info: $(STAMP)
	$(PY) cli.py info --cache $(OUT) $(EXTRA)

distill: $(STAMP)
	$(PY) cli.py distill --cache $(CACHE) --student $(STUDENT) --method $(METHOD) --scenario $(SCENARIO) \
	  --epochs $(EPOCHS) $(EXTRA)

evaluate: $(STAMP)
	$(PY) cli.py evaluate --run $(RUN) $(EXTRA)

report: $(STAMP)
	$(PY) cli.py report runs/*

demo: $(STAMP)
	$(PY) cli.py demo

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(EXTRA)

# the GPU set (ViT-L/14 DINOv2 and CLIP in bf16, extraction with V=4, MobileNetV3-Large at 224 px): one results
# file benchmarks/results/gpu-<device>.{json,md}, about 7 minutes. On a GPU machine without network or .venv:
# bash benchmarks/gpu_wheels.sh here (wheels into .whl/), then there bash benchmarks/gpu_bench.sh OUT_DIR
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench.py --gpu $(EXTRA)

bench-quick: $(STAMP)
	$(PY) benchmarks/bench.py --quick $(EXTRA)

# random byte flips and truncations in a cache's tar shards and arrays (about 15 minutes on 2 cores)
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py $(EXTRA)

# the accuracy study: methods x seeds x (demo, IconShift-dev) x two budgets, then the views study (views, mixing,
# sparse logits); resumable (re-run to continue)
SEEDS   ?= 3
JOBS    ?= 1
study: $(STAMP)
	$(PY) benchmarks/study.py --suite demo --seeds $(SEEDS) --jobs $(JOBS) $(EXTRA)
	$(PY) benchmarks/study.py --suite iconshift --seeds $(SEEDS) --jobs $(JOBS) $(EXTRA)
	$(PY) benchmarks/study_views.py --run --seeds $(SEEDS) --jobs $(JOBS)

clean:
	rm -rf .pytest_cache
