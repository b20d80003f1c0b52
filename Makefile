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
COUNT ?=
OUT ?= outputs
DATA_ARG := $(if $(DATA),data.root=$(DATA),)

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu lint format demo train-simclr train-simclr-all \
        train-glow sweep sweep-offline benchmarks clean

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
	WANDB_MODE=offline $(PY) -m pytest -q -m slow

test-gpu: install ## GPU checks (skipped without CUDA)
	WANDB_MODE=offline $(PY) -m pytest -q -m gpu

lint: install ## ruff check
	$(VENV)/bin/ruff check .

format: install ## ruff format + autofix
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
