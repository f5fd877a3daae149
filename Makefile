# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
# torch==2.13.0 (CPU wheel) is installed first unless the venv already has a torch, so a bare
# `torch` requirement never pulls a multi-GB CUDA build, and a user's own torch is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradwatch-installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradwatch demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gradwatch tests examples benchmarks
