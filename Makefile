# Quick start on a fresh machine: `make run` (train and register), `make test` (the suite).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
PIP_QUIET := --quiet --disable-pip-version-check

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run test test-fast bench dvc-repro ui clean

install: $(STAMP)

# Re-install only when pyproject.toml changed (the stamp is older than it).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install $(PIP_QUIET) -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	@touch $(STAMP)

run: install
	$(BIN)/nnlab run

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/loop_overhead.py

dvc-repro: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

ui: install
	$(BIN)/nnlab ui

clean:
	rm -rf .nnlab data metrics plots reports
