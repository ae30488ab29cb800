# Common entry points. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist worker processes of `make test` / `make test-all` (tests/conftest.py shares the cores among them)
JOBS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install install-prepare install-export demo test test-all bench gpu-wheels gpu-smoke clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)  ## create .venv and install the pinned requirements + the fpet package (editable)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .

install-prepare: $(PY)  ## optional: tensorflow-datasets + backend for scripts/prepare_vtab.py (not needed to train or test)
	$(PY) -m pip install -r requirements-prepare.txt

install-export: $(PY)  ## optional: onnx, onnxscript, onnxruntime for scripts/export.py --format onnx (not needed to train or test)
	$(PY) -m pip install -r requirements-export.txt

demo:  ## train LoRA on the embedded synthetic task with vit_micro (CPU, < 3 min) and print a summary
	$(PY) scripts/demo.py

test:  ## the fast test suite (what CI runs), in $(JOBS) processes (pytest-xdist)
	$(PY) -m pytest -q -m "not slow" -n $(JOBS) $(PYTEST_ARGS)

test-all:  ## every test, slow ones included
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)

bench:  ## efficiency figures (GFLOPs, latency, memory) of the default model, random init, no data
	$(PY) scripts/benchmark.py

gpu-wheels:  ## .whl/: the pure-Python wheels scripts/gpu_check.sh installs on a GPU machine without network
	PYTHON=$(PY) bash scripts/gpu_wheels.sh

gpu-smoke:  ## scripts/gpu_check.sh --cpu-smoke: the GPU check's steps on the CPU at tiny sizes (~1-2 min; makes .whl/ first if empty)
	@ls .whl/*.whl >/dev/null 2>&1 || $(MAKE) gpu-wheels
	PYTHON=$(PY) bash scripts/gpu_check.sh --cpu-smoke

clean:  ## remove caches (keeps .venv, data/ and outputs/)
	rm -rf .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
