# Everything installs into .venv from this project's own files. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build first: an unpinned torch would pull a CUDA build of several GB.
TORCH ?= torch==2.13.0
# Where to get it: empty for pip's configured index; https://download.pytorch.org/whl/cpu for the CPU build on PyPI.
TORCH_INDEX ?=
# The runtime flavour: CUDA where an NVIDIA driver answers, else CPU.
FLAVOUR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
PROMPT ?= Describe this image.
# The model `make demo` runs: empty for the official one (fetched once), or a local model folder.
MODEL ?=

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(FLAVOUR)]"
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[cpu,export,test,bench]"
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime  ## fetch the default model once, then answer about the bundled example image
	$(BIN)/phi-onnx run $(MODEL) -i phi_onnx/assets/example.jpg "$(PROMPT)"

test: $(VENV)/.dev  ## the whole suite on CPU (builds a tiny random-weight model first)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: $(VENV)/.dev  ## side-by-side latency on the `bench` model (several minutes on 2 cores)
	$(BIN)/phi-onnx bench --size bench --json benchmarks/results/cpu-bench.json --plot benchmarks/results/cpu-bench.png

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
