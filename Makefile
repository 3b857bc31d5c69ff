# dtkernels: `make demo` and `make test` work on a fresh machine (they install what
# is missing: see scripts/ensure_deps.py). PYTHON picks the interpreter.
PYTHON ?= python3
PYTEST = $(PYTHON) -m pytest
RESULTS = benchmarks/results
STAMP := $(shell date +%Y%m%d-%H%M)

.PHONY: all deps build test test-native test-triton cuda-check demo bench wheel gpu-check clean

all: build

deps:
	@$(PYTHON) scripts/ensure_deps.py

# The native library, in place (ninja makes rebuilds incremental).
build: deps
	$(PYTHON) setup.py -q build_ext --inplace

# C++/reference/CUDA-compile tests, then the Triton kernels under the interpreter
# in a second process (TRITON_INTERPRET must be set before triton is imported).
test: build
	@$(PYTHON) scripts/ensure_deps.py --test
	$(PYTEST) -q -m "not triton" tests
	TRITON_INTERPRET=1 $(PYTEST) -q -m triton tests

test-native: build
	@$(PYTHON) scripts/ensure_deps.py --test
	$(PYTEST) -q -m "not triton" tests

test-triton: build
	TRITON_INTERPRET=1 $(PYTEST) -q -m triton tests

# Every .cu file compiled to an object with nvcc (no GPU needed); also part of `make test`.
cuda-check:
	$(PYTHON) scripts/check_cuda_compile.py

demo: build
	$(PYTHON) benchmarks/demo.py

bench: build
	@$(PYTHON) scripts/ensure_deps.py --bench
	@mkdir -p $(RESULTS)
	$(PYTEST) benchmarks -o python_files='bench_*.py' -p no:cacheprovider -q \
		--benchmark-json=$(RESULTS)/bench-$(STAMP).json
	$(PYTHON) benchmarks/report.py $(RESULTS)/bench-$(STAMP).json \
		--md $(RESULTS)/bench-$(STAMP).md --png $(RESULTS)/bench-$(STAMP).png

wheel: deps
	@$(PYTHON) scripts/ensure_deps.py --wheel
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .

# On a machine with an NVIDIA GPU: build for its arch, GPU tests, sanitizer, quick bench.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build dist *.egg-info dtkernels/_C*.so dtkernels/_build_config.py .pytest_cache .benchmarks
