# The workbook's commands. On a fresh machine with Python 3.11 and pip, `make run` or
# `make test` first creates .venv and installs the project into it (once: the stamp
# .venv/.installed is redone only when pyproject.toml changes).
#
#   make run                     every notebook at PROFILE (default laptop) -> outputs/
#   make test                    pytest (TEST_ARGS="-m 'not slow'" skips the notebook runs)
#   make notebook NB=02 PROFILE=ci ARGS="-p n_seeds 4"
#   make params NB=02            a notebook's parameters, defaults and help
#   make bench | sync | lab | env | clean-env

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := workbook,metrics,data,test

PROFILE ?= laptop
NB ?=
ARGS ?=
TEST_ARGS ?=
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
ALL_PY := $(sort $(wildcard notebooks/*.py))

.PHONY: help env run test notebook params bench sync lab clean-env

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

env: $(STAMP)

run: $(STAMP)
	@if [ -z "$(NOTEBOOKS)" ]; then echo "no notebooks/NN_*.py to run"; exit 0; fi
	@failed=""; \
	for nb in $(NOTEBOOKS); do \
	  echo "=== $$nb (profile $(PROFILE))"; \
	  $(BIN)/diem-run "$$nb" --profile $(PROFILE) $(ARGS) || failed="$$failed $$nb"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed" >&2; exit 1; fi; \
	echo "all notebooks ran; see outputs/"

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

notebook: $(STAMP)
	@if [ -z "$(NB)" ]; then echo "usage: make notebook NB=02_tweedie_covariance [PROFILE=laptop] [ARGS='-p key value']" >&2; exit 2; fi
	$(BIN)/diem-run $(NB) --profile $(PROFILE) $(ARGS)

params: $(STAMP)
	$(BIN)/diem-run $(or $(NB),--list) $(if $(NB),--list)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mmps.py

# A .py not yet paired (no `formats:` in its jupytext header) is paired with its .ipynb first.
sync: $(STAMP)
	@if [ -z "$(ALL_PY)" ]; then echo "no notebooks to sync"; exit 0; fi
	@for py in $(ALL_PY); do \
	  grep -q '^#  *formats: ipynb,py' "$$py" || $(BIN)/jupytext --set-formats ipynb,py:percent "$$py"; \
	done
	$(BIN)/jupytext --sync $(ALL_PY)

lab: $(STAMP)
	$(BIN)/jupyter lab

clean-env:
	rm -rf $(VENV)
