# Self-documenting Makefile: `make help` lists every target with its `## ` comment.
# Every target depends on `install`, so each one works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RES ?= 256
MODALITY ?= cxr
MODEL ?= m0
DATA ?=
ARGS ?=
SWEEP ?=
SEED ?=
NAME ?=
RUN ?= $(OUT)/demo/patch
RESOLUTIONS ?=
COUNT ?=
OUT ?= outputs
DATA_ARG := $(if $(DATA),data.root=$(DATA),)

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu gpu-check lint format demo train-simclr train-simclr-all \
        train-glow sample-glow sweep sweep-offline phantoms check-data ablations benchmarks clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Need $(PYTHON) (Python >= 3.11) on PATH, or set PYTHON=..."; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its pinned dependencies (idempotent)

test: install ## Fast test tier (CPU, < 15 min on 2 cores)
	@set +e; WANDB_MODE=offline $(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: install ## Slow tier: DDP on CPU (gloo), resume, sweeps as subprocesses
	@set +e; WANDB_MODE=offline $(PY) -m pytest -q -m slow; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests"; exit 1; fi; exit $$rc

gpu-check: install ## One GPU check (<= 8 min on an H100/H200): SimCLR, 2D/3D Glow, locality search at paper scale -> outputs/gpu_check.json (says so and exits 0 without CUDA)
	$(PY) -m experiments.benchmarks.gpu_check $(ARGS)

test-gpu: install ## GPU checks (skipped without CUDA)
	WANDB_MODE=offline $(PY) -m pytest -q -m gpu

lint: install ## ruff check
	$(VENV)/bin/ruff check .

format: install ## ruff format + autofix
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

demo: install ## Both methods end to end on phantom data (profile=cpu): metrics table + report paths
	$(PY) -m experiments.demo $(ARGS)

train-simclr: install ## Train the SimCLR encoder of one patch size: RES=256 [DATA=dir] [ARGS="key=value ..."]
	$(PY) -m experiments.train_simclr simclr.patch_size=$(RES) $(DATA_ARG) $(ARGS)

train-simclr-all: install ## One SimCLR encoder per patch size (profile's patch.patch_sizes, or RESOLUTIONS="128 256")
	@set -e; sizes="$(RESOLUTIONS)"; \
	if [ -z "$$sizes" ]; then sizes=$$($(PY) -m experiments.train_simclr --list-sizes $(ARGS)); fi; \
	for r in $$sizes; do \
	  echo "== SimCLR res $$r =="; \
	  $(PY) -m experiments.train_simclr simclr.patch_size=$$r $(DATA_ARG) $(ARGS); \
	done

ablations: install ## Kim et al. Tables 2 and 3 on a patch run (RUN=outputs/demo/patch; builds what is missing)
	for t in table2 table3; do $(PY) -m experiments.ablations configs/ablations/$$t.yaml out_dir=$(RUN) $(ARGS) || exit 1; done

train-glow: install ## Train Glow M0/M1: MODALITY=cxr|bct MODEL=m0|m1 [DATA=DIR] [ARGS="k=v ..."]
	$(PY) -m experiments.train_glow modality=$(MODALITY) glow.model=$(MODEL) \
	  $(if $(and $(filter bct,$(MODALITY)),$(filter m1,$(MODEL))),trainer.max_epochs=20,) \
	  $(DATA_ARG) $(ARGS)

sample-glow: install ## Fictional images from a Glow (Shibata et al. 4.1): MODALITY=bct|cxr [DATA=dir] [ARGS="checkpoint=PATH ..."]
	$(PY) -m experiments.sample_glow modality=$(MODALITY) $(DATA_ARG) $(ARGS)

sweep: install ## W&B sweep: create SWEEP=configs/sweeps/<name>.yaml on W&B and run an agent here [COUNT=n] [ARGS="key=value ..."]
	@test -n "$(SWEEP)" || { echo "Usage: make sweep SWEEP=configs/sweeps/<name>.yaml [COUNT=n] [ARGS=\"key=value ...\"]"; exit 2; }
	$(PY) -m experiments.sweep $(SWEEP) $(if $(COUNT),--count $(COUNT)) $(ARGS)

sweep-offline: install ## Same sweep file without W&B: grid/random trials here, summary in outputs/sweeps/<name>/ [COUNT=n] [SEED=s] [ARGS=...]
	@test -n "$(SWEEP)" || { echo "Usage: make sweep-offline SWEEP=configs/sweeps/<name>.yaml [COUNT=n] [SEED=s] [ARGS=\"key=value ...\"]"; exit 2; }
	$(PY) -m experiments.sweep_offline $(SWEEP) $(if $(COUNT),--count $(COUNT)) $(if $(SEED),--seed $(SEED)) $(ARGS)

phantoms: install ## Write every phantom data set format into $(OUT)/phantoms
	$(PY) -m datamodules.phantoms --format padchest --out $(OUT)/phantoms/padchest --n 40
	$(PY) -m datamodules.phantoms --format rsna --out $(OUT)/phantoms/rsna --n 20
	$(PY) -m datamodules.phantoms --format bct --out $(OUT)/phantoms/bct --n 10
	$(PY) -m datamodules.phantoms --format folder --modality cxr --out $(OUT)/phantoms/folder-cxr --n 40
	$(PY) -m datamodules.phantoms --format folder --modality bct --out $(OUT)/phantoms/folder-bct --n 10

check-data: install ## Index and check a data set: make check-data NAME=padchest DATA=/data/padchest
	$(PY) -m experiments.check_data data=$(or $(NAME),folder) $(DATA_ARG) $(ARGS)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

benchmarks: install $(VENV)/.bench ## Speed/memory benchmarks, each against its reference in the same run (prints ratios; installs the bench extra: faiss-cpu)
	$(PY) -m experiments.benchmarks.locality_search
	$(PY) -m experiments.benchmarks.simclr_step
	$(PY) -m experiments.benchmarks.simclr_chunk_memory
	$(PY) -m experiments.benchmarks.glow_step

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
