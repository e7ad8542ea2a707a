# collisions-book: `make build` renders the book, `make test` runs the tests. Both install what they need.
#
#   make build                 create/update .venv, execute changed chapters (papermill), render _build/html;
#                              a chapter's results/ and figures/ are kept only when all its checks passed
#   make lint                  ruff (lint + format check) on helpers/, tests/, chapters/ and mypy on helpers/
#   make test                  create/update .venv, lint + pytest + every chapter with quick=True on the CPU, rendered into
#                              a quick book (_build/quick) that the reader's test opens in headless Chromium
#   make build DEVICE=cuda     run the chapters on a GPU (default: auto = cuda when available)
#   make build PYTHON=python3  use an existing interpreter (e.g. a GPU box with torch installed) instead of .venv
#
# MNIST is read from $COLLISIONS_DATA (the folder holding MNIST/raw); next to this repo's checkout on the
# project's offline machines that is ../shared/data, picked up automatically when present.

BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
DEVICE ?= auto
WEIGHTS ?= auto
SEED ?= 0

ifeq ($(origin PYTHON), undefined)
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
else
PY := $(PYTHON)
ENV_STAMP :=
endif

SHARED_DATA := $(wildcard $(CURDIR)/../shared/data/MNIST/raw)
ifneq ($(SHARED_DATA),)
export COLLISIONS_DATA ?= $(abspath $(CURDIR)/../shared/data)
endif
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: env build test lint pytest quick-book reader clean help

help:
	@sed -n '1,13p' Makefile

$(VENV)/.installed: requirements.txt helpers/nodeps.txt pyproject.toml
	test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -r requirements.txt
	$(VENV)/bin/python -m pip install --no-deps -r helpers/nodeps.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

env: $(ENV_STAMP)

build: env
	$(PY) -m helpers.book build --device $(DEVICE) --weights $(WEIGHTS) --seed $(SEED)

lint: env
	$(PY) -m ruff check helpers tests chapters tools
	$(PY) -m ruff format --check helpers tests chapters tools
	$(PY) -m mypy

pytest: env
	$(PY) -m pytest -q

# Quick chapters and their book live in _build/quick (results/ and figures/ too): they never reach `make build`,
# which stages only full runs of the current sources (a quick --out of . or _build is refused).
quick-book: env
	$(PY) -m helpers.book build --quick --device cpu --weights $(WEIGHTS) --seed $(SEED) --force

# The reader's test: every page of the quick book in headless Chromium (screenshots in _build/screenshots).
reader: env
	$(PY) -m helpers.book.reader _build/quick/_build/html --results _build/quick/results --screenshots _build/screenshots

test: env
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint && $(MAKE) --no-print-directory pytest && \
	$(MAKE) --no-print-directory quick-book && \
	$(MAKE) --no-print-directory reader; rc=$$?; \
	echo "[make test] $$(( $$(date +%s) - start )) s"; exit $$rc

clean:
	rm -rf _build results figures/*.png
