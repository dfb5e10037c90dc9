# One command per job; each creates the virtual env, installs the pinned deps and builds csrc/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lomix-installed

# The oldest triton we support (the GPU test machine's), tested through the interpreter and the sm_90
# compile check in a second venv; its interpreter needs numpy < 2.4.
OLD_VENV := .venv-triton-oldest
OLD_STAMP := $(OLD_VENV)/.lomix-installed
OLDEST_TRITON := 3.6.0
# The python that runs the GPU targets: $(PY) itself when it already has CUDA torch (a GPU machine,
# no venv, no network), else the project venv.
GPU_PY = $$($(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
	&& echo $(PY) || { $(MAKE) -s setup >&2 && echo $(BIN)/python; })

.PHONY: setup test test-newest test-triton-oldest test-wheel test-gpu bench cycles bench-full bench-gpu device-check device-pkgs demo clean

$(STAMP): requirements.txt requirements-integrations.txt requirements-integrations-nodeps.txt pyproject.toml setup.py \
		csrc/lomix_cpu.cpp csrc/cpu_level.cpp $(wildcard csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.txt -r requirements-integrations.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-integrations-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: test-newest test-triton-oldest test-wheel  ## the test suite (what .ci/run calls)

test-newest: setup  ## every test, with the newest triton
	$(BIN)/python -m pytest tests

$(OLD_STAMP): requirements.txt
	test -x $(OLD_VENV)/bin/python || $(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==$(OLDEST_TRITON) \
		"numpy<2.4" pytest
	touch $(OLD_STAMP)

test-triton-oldest: setup $(OLD_STAMP)  ## the Triton tests (interpreter + sm_90 compile check) with triton 3.6
	PYTHONPATH=$(CURDIR) $(OLD_VENV)/bin/python -m pytest tests/test_triton.py

bench: setup  ## the main job: speed and memory table against the reference on the SPEC §8 configs
	$(BIN)/python benchmarks/run.py

test-gpu:  ## the Triton tests on a CUDA device instead of the interpreter
	LOMIX_TRITON_ON_GPU=1 $(GPU_PY) -m pytest tests/test_triton.py

bench-gpu:  ## triton vs eager / compiled reference on CUDA (time, peak CUDA memory, floor)
	$(GPU_PY) benchmarks/gpu.py

OUT ?= device-check-out
device-check:  ## the one-shot GPU check (~8 min on one H100) into $(OUT); needs CUDA torch + triton in $(PY)
	$(PY) benchmarks/device_check.py $(OUT)

test-wheel:  ## build a wheel (build isolation), install it into a fresh venv outside the tree, smoke-test it
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w "$$d/dist" . && \
	$(PY) -m venv "$$d/venv" && \
	"$$d/venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 "$$d"/dist/*.whl && \
	cp tests/wheel_smoke.py "$$d/" && cd "$$d" && venv/bin/python wheel_smoke.py

device-pkgs:  ## pytest into .device-pkgs (pure python), for a GPU machine whose python lacks it (carry it there)
	$(PY) -m pip install -q --disable-pip-version-check --target .device-pkgs pytest

CXX ?= g++
CYCLES_MARCH ?= x86-64-v4
cycles:  ## cost of each per-tile CPU kernel function and of the whole tile, in L1, in vector-FMA slots (benchmarks/cpu_cycles.cpp)
	mkdir -p build
	$(CXX) -O3 -std=c++17 -fno-math-errno -fno-trapping-math -march=$(CYCLES_MARCH) -fopenmp benchmarks/cpu_cycles.cpp -o build/cpu_cycles
	build/cpu_cycles

bench-full: setup  ## also the L and pixel scaling sweeps
	$(BIN)/python benchmarks/run.py --sweep --configs synapse2d --impls cpu --name sweep

demo: setup
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) $(OLD_VENV) .device-pkgs build *.egg-info lomix_kernels/*.so
