# The workbook's commands (README.md says more). On a fresh machine with Python 3.11 and pip,
# the first `make` creates .venv and installs the project into it (once: the stamp
# .venv/.installed is redone only when pyproject.toml changes).
#
#   make run PROFILE=ci          start here: every notebook as a smoke test, about 2½ min
#                                each on 2 CPU cores (numbers are noise) -> outputs/NB/ci/
#   make lab                     JupyterLab on 127.0.0.1:8888, notebooks/*.py open as notebooks;
#                                Run All uses the defaults: about 6 min each on 2 CPU cores
#                                (LAB_PORT=8890, LAB_IP=0.0.0.0, LAB_ARGS=...; over SSH: README)
#   make run                     every notebook at PROFILE=laptop (default): 11-28 min each on
#                                2 CPU cores, about 1½ hours in all (docs/results.md shows them)
#   make run PROFILE=paper       the paper's configuration, for GPU nodes
#   make test                    pytest: 495 tests when written (TEST_ARGS="-m 'not slow'" skips
#                                the notebook runs and the browser check)
#   make notebook NB=02 PROFILE=ci ARGS="-p seeds 4"
#   make params NB=02            a notebook's parameters, defaults and help
#   make table1                  Table 1's ablation: notebook 03 at PROFILE with Tweedie's
#                                covariance (outputs/03_cifar10/PROFILE, shared with make run) and
#                                the two heuristics (outputs/03_cifar10/PROFILE-sigma_over_1p, -sigma)
#   make report                  docs/results.md: each notebook's run (PROFILE) beside the paper
#   make data                    fetch CIFAR-10 (170 MB, MD5-checked) into data/; notebooks 03
#                                and 05 otherwise fetch it at first use (DIEMLIB_DOWNLOAD=0: never)
#   make check-lab               headless Chromium: every notebooks/*.py opens as a notebook
#   make gpu-smoke               on a GPU node, in minutes: one short lap of notebooks 01, 03, 04
#                                and 05 at profile paper, E-/M-step throughput and peak memory
#                                (ARGS="--only 03,04"; ARGS=--tiny: the CPU check, a few minutes)
#   make bench | sync | env | clean-env

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := workbook,metrics,data,test
# JupyterLab opens .py files with jupytext's notebook view (jupyter-config/README.md): the
# project's setting, copied into the venv, never into ~/.jupyter.
LABCONFIG_SRC := jupyter-config/labconfig/default_setting_overrides.json
LABCONFIG := $(VENV)/etc/jupyter/labconfig/default_setting_overrides.json
READY := $(STAMP) $(LABCONFIG)

PROFILE ?= laptop
NB ?=
ARGS ?=
TEST_ARGS ?=
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
# No browser to open on a headless node; as root (a container), Jupyter needs --allow-root.
LAB_NO_BROWSER := $(if $(or $(DISPLAY),$(WAYLAND_DISPLAY),$(filter Darwin,$(shell uname -s))),,--no-browser)
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
ALL_PY := $(sort $(wildcard notebooks/*.py))

.PHONY: help env run table1 test notebook params report data bench gpu-smoke sync lab check-lab clean-env

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

$(LABCONFIG): $(LABCONFIG_SRC) | $(BIN)/python
	mkdir -p $(@D)
	cp $< $@

env: $(READY)

run: $(READY)
	@if [ -z "$(NOTEBOOKS)" ]; then echo "no notebooks/NN_*.py to run"; exit 0; fi
	@failed=""; \
	for nb in $(NOTEBOOKS); do \
	  echo "=== $$nb (profile $(PROFILE))"; \
	  $(BIN)/diem-run "$$nb" --profile $(PROFILE) $(ARGS) || failed="$$failed $$nb"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed" >&2; exit 1; fi; \
	echo "all notebooks ran; see outputs/"

# Same seed, data and laps; each run resumable in its own directory. `make report` shows them side by side.
table1: $(READY)
	@failed=""; \
	for cov in tweedie sigma_over_1p sigma; do \
	  out=outputs/03_cifar10/$(PROFILE)$$([ $$cov = tweedie ] || echo "-$$cov"); \
	  echo "=== 03_cifar10 (profile $(PROFILE), covariance $$cov) -> $$out"; \
	  $(BIN)/diem-run 03_cifar10 --profile $(PROFILE) $(ARGS) -p covariance $$cov --out $$out || failed="$$failed $$cov"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed" >&2; exit 1; fi

test: $(READY)
	$(BIN)/python -m pytest $(TEST_ARGS)

notebook: $(READY)
	@if [ -z "$(NB)" ]; then echo "usage: make notebook NB=02_tweedie_covariance [PROFILE=laptop] [ARGS='-p key value']" >&2; exit 2; fi
	$(BIN)/diem-run $(NB) --profile $(PROFILE) $(ARGS)

params: $(READY)
	$(BIN)/diem-run $(or $(NB),--list) $(if $(NB),--list)

report: $(READY)
	$(BIN)/python -m diemlib.workbook.report --profile $(PROFILE)

data: $(READY)
	$(BIN)/python -m diemlib.data

bench: $(READY)
	$(BIN)/python benchmarks/bench_mmps.py
	$(BIN)/python benchmarks/bench_mstep.py
	$(BIN)/python benchmarks/bench_estep.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_compile.py

gpu-smoke: $(READY)
	$(BIN)/python benchmarks/gpu_smoke.py $(ARGS)

# A .py not yet paired (no `formats:` in its jupytext header) is paired with its .ipynb first.
sync: $(READY)
	@if [ -z "$(ALL_PY)" ]; then echo "no notebooks to sync"; exit 0; fi
	@for py in $(ALL_PY); do \
	  grep -q '^#  *formats: ipynb,py' "$$py" || $(BIN)/jupytext --set-formats ipynb,py:percent "$$py"; \
	done
	$(BIN)/jupytext --sync $(ALL_PY)

lab: $(READY)
	$(BIN)/jupyter lab --ip=$(LAB_IP) --port=$(LAB_PORT) $(LAB_NO_BROWSER) $(LAB_ROOT) $(LAB_ARGS)

check-lab: $(READY)
	$(BIN)/python scripts/check_lab.py

clean-env:
	rm -rf $(VENV)
