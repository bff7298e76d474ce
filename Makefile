# egg_eval — `make help` lists the targets.
PY ?= python
TORCH ?= torch==2.13.0

.PHONY: help install test lint format eval smoke tables demo bench toy-vlm

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

install:  ## install torch (TORCH=...) and egg_eval with its dev tools, editable
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"

test:  ## run the test suite (CPU, offline)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest

lint:  ## ruff lint + format check
	$(PY) -m ruff check egg_eval tests scripts
	$(PY) -m ruff format --check egg_eval tests scripts

format:  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix egg_eval tests scripts
	$(PY) -m ruff format egg_eval tests scripts

eval:  ## run the built-in default (offline): python -m egg_eval
	$(PY) -m egg_eval

smoke:  ## every dataset config end-to-end on the toy subsets and a tiny model
	$(PY) scripts/smoke.py

tables:  ## results/runs -> the paper's Tables 1-6 (Markdown, CSV, LaTeX) in results/tables/paper
	$(PY) -m egg_eval.tables

demo:  ## the toy LLaVA on 300 held-out detail scenes: vanilla vs EGG K=1/K=2 vs oracle/random crops, pictures
	$(PY) scripts/demo.py

bench:  ## vanilla vs EGG: time per sample, grounding pass vs forward, peak memory, passes (CPU toy model)
	$(PY) scripts/bench.py --repeats 3

toy-vlm:  ## retrain the shipped toy LLaVA from scratch (CPU, deterministic) into egg_eval/assets/toy_vlm
	$(PY) scripts/train_toy_vlm.py
