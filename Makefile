# distkern — the README's two commands:
#   make bench    create .venv, install torch + distkern (compiled, with its test, bench and plot extras) + the
#                 in-tree plugins, run `distkern bench`
#   make test     same install, then the whole test suite
#
# On a GPU machine whose Python already has a CUDA torch (and no network):
#   make test SYSTEM_TORCH=1 VENV=/tmp/dkvenv     venv with --system-site-packages, nothing downloaded
#   make gpu-wheels     peer-library wheels in .whl/ for benchmarks/gpu_check.sh there (the device call carries .whl)
#
# Variables: PYTHON (interpreter for the venv), VENV, TORCH (pip spec), TORCH_PIP_ARGS (e.g. --index-url
# https://download.pytorch.org/whl/cpu for a CPU-only torch), MAX_JOBS, DISTKERN_CUDA (0/1), PYTEST_ARGS, BENCH_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SYSTEM_TORCH ?= 0
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
BENCH_ARGS ?=

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.distkern-stamps
SOURCES := $(shell find csrc python plugins -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' -o -name '*.toml' \) -not -path '*/__pycache__/*' -not -name '_build_info.py' 2>/dev/null) setup.py pyproject.toml
PLUGINS := $(wildcard plugins/*/pyproject.toml)

ifeq ($(SYSTEM_TORCH),1)
VENV_FLAGS := --system-site-packages
PIP_OFFLINE := --no-index --no-deps
else
VENV_FLAGS :=
PIP_OFFLINE :=
endif

.PHONY: help install test bench test-cuda cmake-check gpu-wheels clean

help:
	@sed -n '1,10p' Makefile

$(STAMP)/venv:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
ifeq ($(SYSTEM_TORCH),1)
	$(VPY) -c "import torch; print('using the system torch', torch.__version__, 'CUDA', torch.version.cuda)"
else
	$(VPY) -m pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(VPY) -m pip install -q numpy setuptools wheel ninja
endif
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/install: $(STAMP)/venv $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install -q --no-build-isolation $(PIP_OFFLINE) ".[test,bench,plot]"
	@for p in $(dir $(PLUGINS)); do \
		echo "installing plugin $$p"; \
		$(VPY) -m pip install -q --no-build-isolation $(PIP_OFFLINE) "./$$p" || exit 1; \
	done
	@touch $@

install: $(STAMP)/install

# One process on purpose: pytest-xdist with two workers on the 2-core CI machine was several times slower
# (two processes' OpenMP pools, nvcc and the sanitized emulation fighting for two cores); the suite's
# heavy tests use both cores themselves.
test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/distkern bench $(BENCH_ARGS)

test-cuda: install
	$(VPY) -m pytest -q -m cuda $(PYTEST_ARGS)

# Peer libraries for benchmarks/gpu_check.sh on a GPU machine without network: wheels in .whl/ (git-ignored),
# which the device call carries. Pure-Python wheels, at the versions the CPU tests use; KeOps and keopscore
# ship as sdists, so their wheels are built here.
GPU_WHEELS ?= diffusers==0.42.1 geomloss==0.3.1
GPU_SDISTS ?= pykeops==2.3 keopscore==2.3
gpu-wheels: $(STAMP)/venv
	rm -rf .whl && mkdir -p .whl/src
	$(VPY) -m pip download -q --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)
	$(VPY) -m pip download -q --no-deps --no-binary=:all: -d .whl/src $(GPU_SDISTS)
	$(VPY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/*
	rm -rf .whl/src && ls -l .whl

# The standalone CUDA compile check (also run by the test suite).
cmake-check:
	cmake -S . -B build/cmake -G Ninja && cmake --build build/cmake

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/distkern/_C*.so python/distkern/_build_info.py $(STAMP)
