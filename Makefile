# Two commands do everything on a fresh machine with Python 3.11, pip and git:
#   make repro   create .venv, install, run the pipeline (dvc repro) on the built-in data
#   make test    create .venv, install, run the default test suite (fast: unit tests and one CLI smoke run)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Run DVC stages with the venv's `segshift` on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-integration test-slow test-all bench bench-engine gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/pytest -q

# Real services (moto S3, mlflow server, Ray), several processes, whole stages and pipelines.
test-integration: install
	$(BIN)/pytest -q -m "integration and not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q -m "slow or not slow"

bench: install
	$(BIN)/segshift bench

# The engine's training step against a bare torch loop, FLOP/s and share of the CPU's peak, per
# precision, layout and torch.compile (on a quiet machine: minutes, each compile included).
bench-engine: install
	$(BIN)/segshift bench engine

# Every GPU path on one CUDA GPU (built to fit 10 min; not yet run on one): cuda tests, a step of every method, the main job,
# R101 throughput and FLOP/s, profile -> reports/gpu-check/gpu_check.{json,md}. Skips without a GPU.
gpu-check: install
	$(BIN)/segshift gpu-check

clean:
	rm -rf $(VENV) data .pytest_cache
