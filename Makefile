# Each target creates (or reuses) the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
TRAIN_ARGS ?=

.PHONY: venv train test test-fast test-all lint bench clean-cache

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)  ## the main job: Transfusion on the embedded shapes world, 4,000 steps (README: time per CPU class); TRAIN_ARGS="--trainer.max_time ..." adds flags
	$(PY) -m lit_transfusion fit --config configs/shapes/tiny.yaml $(TRAIN_ARGS)

test: $(STAMP)  ## the whole test suite, slow tests included
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## skip the slow tests (multi-process, notebook, retraining)
	$(PY) -m pytest -q -m "not slow"

test-all: test  ## alias of test

lint: $(STAMP)  ## ruff (configuration in pyproject.toml)
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## training step time, tokens/s, peak RSS, MFU for the tiny config
	$(PY) benchmarks/train_step.py --config configs/shapes/tiny.yaml

clean-cache:  ## drop cached tokenizer/latents (they are rebuilt on the next run)
	rm -rf .cache
