# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ganflow-installed
# Torch is installed first, pinned to the CPU build 2.13.0 that pip finds on this machine's disk;
# the project's own range (<2.14) is then already satisfied and pip downloads no CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ganflow demo

test: $(STAMP)
	# two workers: one per core (each test process uses one intra-op thread, see tests/conftest.py)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check ganflow problems tests scripts

clean:
	rm -rf $(VENV) demo_output .pytest_cache
