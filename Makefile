# Two commands: `make run` (the default experiment) and `make test` (the test suite).
# Each creates .venv if missing and installs the pinned dependencies (torch first, CPU wheel).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export FEDLORA_DATA_DIR ?= $(abspath ../shared/data/glue)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test bench install clean

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedlora run

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
