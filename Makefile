# chainrule: `make test` and `make bench` set everything up from nothing.
#   make test        virtual environment + torch + build deps, build and install chainrule, run all tests
#   make bench       the same set-up, then the benchmark suite in quick mode (< 10 minutes)
#   make bench-full  every benchmark at every size
#   make dev         fast in-tree rebuild for development: build/dev, _C copied into python/chainrule
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(abspath $(VENV))/bin/python
PIP := $(PY) -m pip
JOBS ?= $(shell nproc)
# The CUDA toolkit's root, from nvcc itself (nvcc on PATH may be a wrapper script elsewhere).
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ _HERE_=\(.*\)\/bin$$/\1/p' | head -n 1)
export CUDA_HOME
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)
PYTEST_ARGS ?=

.PHONY: test bench bench-full install venv dev clean

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	$(PIP) install -qq "$(TORCH_SPEC)" numpy scikit-build-core pybind11 ninja cmake \
		pytest hypothesis expecttest matplotlib tqdm nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm \
		"transformers>=5.24,<6" mlxtend scikit-learn
	touch $@

venv: $(VENV)/.deps

install: venv
	@echo "chainrule: building with CUDA_HOME=$(CUDA_HOME)"
	time $(PIP) install -qq --no-build-isolation --no-deps .

test: install
	cd tests && time $(PY) -m pytest -q -ra $(PYTEST_ARGS) .

bench: install
	$(PY) benchmarks/run_all.py --quick

bench-full: install
	$(PY) benchmarks/run_all.py

dev: venv
	$(VENV)/bin/cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DSKBUILD_PROJECT_VERSION=0.1.0.dev0
	$(VENV)/bin/cmake --build build/dev
	cp build/dev/_C*.so python/chainrule/

clean:
	rm -rf build python/chainrule/_C*.so
