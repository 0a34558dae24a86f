# Two commands for a fresh machine with Python 3.11+:  `make run`  and  `make test`.
# Both create or reuse .venv and install what they need (idempotent: a stamp file tracks pyproject.toml).

PY ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned, from pip's configured index only (no index URL here).  On a machine without
# nvidia-smi the pinned version must resolve to a CPU build: pip resolves it first without
# downloading (--dry-run --report) and the install stops with an error if it would pull CUDA
# packages, instead of fetching gigabytes or falling back to an unpinned torch.  A GPU machine
# gets the same pinned version, CUDA build allowed.  TORCH_VERSION=... overrides the pin.
TORCH_VERSION ?= 2.13.0

.PHONY: run test install lint bench bench-all clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "Python 3.11+ is required (python3.11/3.12/3.13 on PATH)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	@set -e; \
	if $(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; \
	then echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else $(BIN)/pip install -q --dry-run --report - "torch==$(TORCH_VERSION)" | $(BIN)/python .ci/torch_plan.py \
	  || { echo "ERROR: pip's configured index serves torch==$(TORCH_VERSION) only as a CUDA build on this"; \
	       echo "CPU-only machine (several GB). Configure an index or find-links that serves its CPU build,"; \
	       echo "or set TORCH_VERSION to a version that has one. Nothing was installed."; exit 1; }; \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	  $(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
	  || { echo "ERROR: the installed torch is a CUDA build on a CPU-only machine"; exit 1; }; fi
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/autointerv run --config examples/demo.yaml

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check services tests bench

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

bench-all: $(STAMP)
	for b in pipeline embedding clustering generation active_sampling cascade faust_vs_aiokafka; do \
	  $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .data runs .pytest_cache .ruff_cache
