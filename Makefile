# chainrule: `make test` and `make bench` set everything up from nothing.
#   make test        virtual environment + torch + build deps, build and install chainrule, run all tests
#   make bench       the same set-up, then the benchmark suite in quick mode (< 10 minutes)
#   make demo        the same set-up, then the MNIST example: chainrule's and torch's accuracy and time per step
#   make bench-full  every benchmark at every size
#   make dev         fast in-tree rebuild for development: build/dev, _C copied into python/chainrule
#   make test-torch TORCH_SPEC=torch==2.6.0   the suite against another torch, in its own
#                    environment (.venv-torch-2.6.0) and build folder (build/torch-2.6.0)
#   make test-sanitize  the CPU and emulated kernels built with AddressSanitizer and
#                    UndefinedBehaviorSanitizer (build/sanitize), running the CPU test subset
#                    $(SANITIZE_TESTS) (docs/reliability.md)
#   make gpu-check   on a GPU machine with torch installed (no network needed): build for its GPU,
#                    run the CUDA checks, report in $(GPU_CHECK_DIR) (README.md, "GPU check")
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
# Where pip builds (scikit-build-core's build-dir); empty: pyproject.toml's build/{wheel_tag}.
BUILD_DIR ?=
GPU_CHECK_DIR ?= gpu-check-report
SANITIZE_DIR ?= build/sanitize
SANITIZE_TESTS ?= test_errors.py test_zero_size.py test_nonfinite.py test_adam.py test_cpu_isa.py \
	test_concurrency.py test_determinism.py test_opcheck.py test_gemv.py test_gemm_path.py
# Python is not instrumented: libasan must be loaded first (LD_PRELOAD), and libstdc++ with it so
# that ASan finds the real __cxa_throw (torch's checks throw). Leak detection is off because the
# interpreter's and torch's allocations still live at exit would be reported; halt on the first
# error. pytest captures with --capture=sys so that a sanitizer report on fd 2 is never swallowed.
SANITIZE_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONPATH=$(abspath $(SANITIZE_DIR))/python

.PHONY: test bench bench-full demo install venv dev clean test-torch gpu-check test-sanitize

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
	time $(PIP) install -qq --no-build-isolation --no-deps \
		$(if $(BUILD_DIR),--config-settings=build-dir=$(BUILD_DIR)) .

test: install
	cd tests && time $(PY) -m pytest -q -ra $(PYTEST_ARGS) .

demo: install
	$(PY) examples/mnist_mlp.py

bench: install
	$(PY) benchmarks/run_all.py --quick

bench-full: install
	$(PY) benchmarks/run_all.py

TORCH_TAG = $(subst torch==,,$(TORCH_SPEC))
test-torch:
	$(MAKE) test VENV=.venv-torch-$(TORCH_TAG) TORCH_SPEC="$(TORCH_SPEC)" \
		BUILD_DIR=build/torch-$(TORCH_TAG)

# Uses the python on PATH (or PYTHON=...), whose torch must see the GPU; builds into build/gpu-check.
gpu-check:
	$(PYTHON) tools/gpu_check.py --report-dir $(GPU_CHECK_DIR) --jobs $(JOBS)

# The package is assembled in $(SANITIZE_DIR)/python (Python sources + the sanitized _C), so the
# tests import it, not the installed one or a _C built in place.
test-sanitize: venv
	$(VENV)/bin/cmake -S . -B $(SANITIZE_DIR) -G Ninja -DPython_EXECUTABLE=$(PY) \
		-DSKBUILD_PROJECT_VERSION=0.1.0.dev0 -DCHAINRULE_CUDA=OFF -DCHAINRULE_SANITIZE=ON
	time $(VENV)/bin/cmake --build $(SANITIZE_DIR)
	rm -rf $(SANITIZE_DIR)/python && mkdir -p $(SANITIZE_DIR)/python/chainrule
	cp python/chainrule/*.py $(SANITIZE_DIR)/python/chainrule/
	cp $(SANITIZE_DIR)/_C*.so $(SANITIZE_DIR)/python/chainrule/
	cd tests && time env $(SANITIZE_ENV) $(PY) -m pytest -q -ra -p no:cacheprovider --capture=sys \
		$(PYTEST_ARGS) $(SANITIZE_TESTS)

dev: venv
	$(VENV)/bin/cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DSKBUILD_PROJECT_VERSION=0.1.0.dev0
	$(VENV)/bin/cmake --build build/dev
	cp build/dev/_C*.so python/chainrule/

clean:
	rm -rf build python/chainrule/_C*.so
