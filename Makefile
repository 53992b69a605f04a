# All set-up happens here, into a local virtual environment (.venv), so that a fresh
# clone needs nothing but Python 3.10+ and, for the integration tests, Debian's apt.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is a CPU wheel on local disk; any other spec pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,optimizer,default-model,openvino,dev
ARTIFACTS ?= artifacts
DEMO_MODEL ?= $(ARTIFACTS)/minilm
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install system-deps protos check-protos test test-fast demo bench clean

help:
	@echo "make demo   - install, optimize the default model, serve it and query it"
	@echo "make test   - install everything and run the whole test suite"
	@echo "make bench  - run the benchmarks and refresh BENCHMARKS.md"
	@echo "make protos - regenerate the gRPC stubs from protos/"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The suite runs the versions the images ship: deploy/docker/constraints.txt bounds every
# package it names (a new upstream release cannot change what CI tests overnight).
CONSTRAINTS ?= deploy/docker/constraints.txt

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# promtool/prometheus for the deploy tests, libb64 for perf_analyzer; only when root and missing.
system-deps:
	@bash deploy/scripts/install-system-deps.sh

protos: install
	$(BIN)/python -m pruneserve.server.protogen

check-protos: install
	$(BIN)/python -m pruneserve.server.protogen --check

test: install system-deps check-protos
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not integration"

demo: install
	bash scripts/demo.sh

bench: install system-deps
	$(BIN)/python -m benchmarks --full

clean:
	rm -rf $(VENV) $(ARTIFACTS) .pytest_cache build *.egg-info
