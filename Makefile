# Quick start on a fresh machine: `make run` (train and register), `make test` (the suite).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
PIP_QUIET := --quiet --disable-pip-version-check

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run compare test test-fast test-docs bench dvc-repro ui lock catalogue clean

install: $(STAMP)

# Re-install only when pyproject.toml or constraints.txt changed (the stamp is older than them). The exact
# versions come from constraints.txt, so a new MLflow or Prefect release changes nothing until `make lock`.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install $(PIP_QUIET) -c constraints.txt -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	@touch $(STAMP)

run: install
	$(BIN)/nnlab run

# The six image architectures side by side on digits (params.yaml's settings for each).
compare: install
	$(BIN)/nnlab run --models mlp,simple_cnn,vgg,resnet,inception,mobilenet

# One pytest worker per core, at most 4 (pytest-xdist): every test process runs torch on one thread
# (tests/conftest.py), so a second worker uses the second core instead of waiting on one. TEST_JOBS=0: serial.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

test: install
	$(BIN)/python -m pytest -q -m "not docs_run" -n $(TEST_JOBS) --dist worksteal

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not docs_run" -n $(TEST_JOBS) --dist worksteal

# Every command of the README's and docs/' bash blocks, in order, on a fresh copy of the checkout, with NNLAB_QUICK
# (tests/test_docs_run.py, 8 min on 2 cores): apart from `make test` so the suite keeps within 15 minutes; CI runs both.
test-docs: install
	$(BIN)/python -m pytest -q -m docs_run -rP tests/test_docs_run.py

bench: install
	$(BIN)/python benchmarks/loop_overhead.py

dvc-repro: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

ui: install
	$(BIN)/nnlab ui

# models/catalogue.json: `nnlab models`' table for the default input, shipped so a fresh clone's first call is quick;
# write it again after changing an architecture (models/*.py): tests/test_models.py checks it is current.
catalogue: install
	$(BIN)/python -c "from flows.admin import write_catalogue; write_catalogue()"

# Refresh constraints.txt: the newest versions pyproject.toml allows, resolved in a scratch venv; then `make test`.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install $(PIP_QUIET) -e '.[dev]'
	{ head -n 2 constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf .venv-lock

# Built data, checkpoints, caches and reports; the records stay: the MLflow store (mlruns/) and the project's Prefect
# flow-run history (.nnlab/prefect/, what `nnlab history` reads)
clean:
	rm -rf data metrics plots reports
	@if [ -d .nnlab ]; then find .nnlab -mindepth 1 -maxdepth 1 ! -name prefect -exec rm -rf {} +; fi
