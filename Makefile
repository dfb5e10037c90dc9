# One command per job; each creates the virtual env, installs the pinned deps and builds csrc/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lomix-installed

.PHONY: setup test test-gpu bench bench-full bench-gpu demo clean

$(STAMP): requirements.txt pyproject.toml setup.py csrc/lomix_cpu.cpp
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup  ## the test suite (what .ci/run calls)
	$(BIN)/python -m pytest tests

bench: setup  ## the main job: speed and memory table against the reference on the SPEC §8 configs
	$(BIN)/python benchmarks/run.py

test-gpu: setup  ## the Triton tests on a CUDA device instead of the interpreter
	LOMIX_TRITON_ON_GPU=1 $(BIN)/python -m pytest tests/test_triton.py

bench-gpu: setup  ## triton vs eager / compiled reference on CUDA (time, peak CUDA memory, memory floor)
	$(BIN)/python benchmarks/gpu.py

bench-full: setup  ## also the L and pixel scaling sweeps
	$(BIN)/python benchmarks/run.py --sweep --configs synapse2d --impls cpu --name sweep

demo: setup
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info lomix_kernels/*.so
