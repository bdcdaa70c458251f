# The few commands a newcomer needs. Each one sets up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo lint format

setup:
	VENV=$(VENV) bash scripts/install.sh

test: setup  ## the whole suite, slow end-to-end runs included (what CI runs)
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup  ## the main job: offline two-stage training on real pretrained backbones
	$(VENV)/bin/mllm demo --output runs/demo

lint:
	$(VENV)/bin/ruff check mllm scripts tests && $(VENV)/bin/ruff format --check mllm scripts tests

format:
	$(VENV)/bin/ruff check --fix mllm scripts tests && $(VENV)/bin/ruff format mllm scripts tests
