# Two commands for a fresh machine with Python 3.11+:  `make run`  and  `make test`.
# Both create or reuse .venv and install what they need (idempotent: a stamp file tracks pyproject.toml).

PY ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch (never a multi-GB CUDA build); GPU machines keep pip's default.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0

.PHONY: run test install lint bench bench-all clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "Python 3.11+ is required (python3.11/3.12/3.13 on PATH)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BIN)/pip install -q torch --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; fi
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
