# Everything sets itself up: a fresh machine needs only python3.
#   make demo       train + capture + every technique + report, into demo-out/
#   make test       build, compile-check the CUDA sources (when nvcc is on PATH), install the system HDF5
#                   (libhdf5-dev, hdf5-tools: apt-get as root, when missing; else a message), the gates
#                   (ruff format + lint, mypy), install a headless Chromium (the system package chromium:
#                   apt-get as root, when missing; else a message; the browser test of the report skips
#                   without one), then the tests against the built package
#   make dev        an editable install: tests and tools see edits to pyengine/ and plugins/
#                   without a reinstall (C++ edits still need `make dev` again)
#   make lint / make typecheck   the gates alone
#   make fuzz       the ops fuzz at length (FUZZ_EXAMPLES=5000 random examples, one child process)
#   make sanitize   the ops built with AddressSanitizer + UBSan (PYENGINE_SANITIZE=ON, CPU only) in its
#                   own venv and build dir (build/asan/), then the op tests (SANITIZE_TESTS) and the ops
#                   fuzz (FUZZ_EXAMPLES random examples) under them; any report fails it. Not part of test
#   make bench      the benchmarks (ratios against anchors measured in the same run)
#   make gpu-check  on a CUDA machine, with $(PYTHON)'s torch (no venv): build with CUDA, the CUDA tests,
#                   every benchmark with --device cuda, one summary table; without a GPU it says so and exits 0
#                   (python3 benchmarks/gpu_check.py --dry-run prints the plan)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH ?= torch==2.13.0
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=3" ninja "cmake>=3.21" setuptools
RUNTIME_DEPS := "pluggy>=1.5" "h5py>=3.8" "numpy>=1.24"
TEST_DEPS := "pytest>=7" "scikit-learn>=1.3" "captum>=0.7" "hypothesis>=6" "transformers>=4.40"
GATE_DEPS := "ruff==0.17.6" "mypy==2.4.1"
SOURCES := pyengine plugins tests benchmarks examples scripts
CUDA_ARCH ?= 90
FUZZ_EXAMPLES ?= 5000
# make sanitize: an uninstrumented python loads the instrumented extension, so the ASan runtime is
# preloaded (and libstdc++ with it, or ASan cannot intercept __cxa_throw: every C++ exception, e.g. a
# TORCH_CHECK, would abort). python leaks by design: no leak check. A UBSan report halts (exit 1).
ASAN_VENV := build/asan/venv
ASAN_PY := $(ASAN_VENV)/bin/python
ASAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
SANITIZE_TESTS ?= tests/test_ops_*.py tests/test_pathwise.py tests/test_synchrony.py

.PHONY: all setup build dev lint typecheck test fuzz sanitize demo bench nvcc-check system-hdf5 system-browser gpu-check clean

all: test

$(VENV)/.ready: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install -q $(BUILD_DEPS) $(RUNTIME_DEPS) $(TEST_DEPS) $(GATE_DEPS)
	touch $@

setup: $(VENV)/.ready

build: setup
	$(PY) -P scripts/build_progress.py "native build" -- $(PIP) install -v --no-build-isolation --no-deps .

dev: setup
	$(PY) -P scripts/build_progress.py "native build" -- \
	  $(PIP) install -v --no-build-isolation --no-deps --config-settings=editable.rebuild=false -e .

lint: setup
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/ruff check $(SOURCES)

# mypy checks the tree as it ships: pyengine/ with plugins/ as pyengine.plugins (symlinks).
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/pyengine
	cp -rs "$(CURDIR)/pyengine/." build/typecheck/pyengine/
	ln -s "$(CURDIR)/plugins" build/typecheck/pyengine/plugins
	cd build/typecheck && "$(CURDIR)/$(VENV)/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" -p pyengine

nvcc-check:
	@if command -v nvcc >/dev/null 2>&1; then \
	  for f in csrc/cuda/*.cu; do \
	    echo "nvcc compile check (sm_$(CUDA_ARCH)): $$f"; \
	    nvcc -std=c++20 -arch=sm_$(CUDA_ARCH) -Icsrc/core/include -c $$f -o /dev/null || exit 1; \
	  done; \
	else echo "nvcc not on PATH: CUDA compile check skipped"; fi

# The system's HDF5 C library, headers and tools (what C++ tools link, not the copy inside h5py's wheel), for
# tests/test_hdf5_compat.py and examples/cpp/capture_gram: installed with apt-get when missing and we are root;
# otherwise (or if the install fails) a message says what is missing, and those tests skip. Never fatal.
HDF5_PACKAGES := libhdf5-dev hdf5-tools
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(HDF5_PACKAGES)
system-hdf5:
	@command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || { \
	  command -v h5dump >/dev/null 2>&1 || echo "system-hdf5: no apt-get here: install the HDF5 C library, headers and \
	tools (h5dump, h5ls) with your package manager, else the tests that read captures with them skip"; exit 0; }; \
	missing=""; for package in $(HDF5_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "ok installed" || missing="$$missing $$package"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "system-hdf5: missing$$missing (not root: run sudo apt-get install$$missing); the tests that need them skip"; \
	  exit 0; fi; \
	echo "system-hdf5: installing$$missing (apt-get)"; \
	log=$$(mktemp); \
	$(APT_INSTALL) >$$log 2>&1 || { apt-get update -q >>$$log 2>&1 && $(APT_INSTALL) >>$$log 2>&1; } || { \
	  tail -n 5 $$log; echo "system-hdf5: could not install$$missing; the tests that need them skip"; }; \
	rm -f $$log

# A headless Chromium (the system package chromium, without its recommends) for tests/test_report_browser.py,
# which loads the demo's report in it: installed with apt-get when missing and we are root; otherwise (or if the
# install fails) a message says so, and that test skips. Never fatal. Nothing to do when a browser the test finds
# is there already: $PYENGINE_CHROMIUM (a path or a name), else one of BROWSERS on PATH (as tests/browser.py looks).
BROWSERS := chromium chromium-browser google-chrome
BROWSER_PACKAGES := chromium
APT_INSTALL_BROWSER := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES)
system-browser:
	@for browser in "$$PYENGINE_CHROMIUM" $(BROWSERS); do \
	  [ -n "$$browser" ] && command -v "$$browser" >/dev/null 2>&1 && exit 0; \
	done; \
	command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || { \
	  echo "system-browser: no Chromium and no apt-get here: install Chromium with your package manager (or set \
	PYENGINE_CHROMIUM), else the browser test of the report skips"; exit 0; }; \
	missing=""; for package in $(BROWSER_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "ok installed" || missing="$$missing $$package"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "system-browser: missing$$missing (not root: run sudo apt-get install --no-install-recommends$$missing); \
	the browser test of the report skips"; \
	  exit 0; fi; \
	echo "system-browser: installing$$missing (apt-get)"; \
	log=$$(mktemp); \
	$(APT_INSTALL_BROWSER) >$$log 2>&1 || { apt-get update -q >>$$log 2>&1 && $(APT_INSTALL_BROWSER) >>$$log 2>&1; } || { \
	  tail -n 5 $$log; echo "system-browser: could not install$$missing; the browser test of the report skips"; }; \
	rm -f $$log

test: lint typecheck build nvcc-check system-hdf5 system-browser
	$(VENV)/bin/pytest

# The ops fuzz (tests/ops_fuzz.py, in one child process) at length, with a fresh random seed.
fuzz: build
	PYENGINE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PYENGINE_FUZZ_RANDOM=1 $(VENV)/bin/pytest -q -s tests/test_ops_safety.py -k fuzz

$(ASAN_VENV)/.ready: Makefile
	test -x $(ASAN_PY) || $(PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_PY) -c "import torch" 2>/dev/null || $(ASAN_PY) -m pip install $(TORCH)
	$(ASAN_PY) -m pip install -q $(BUILD_DEPS) $(RUNTIME_DEPS) $(TEST_DEPS)
	touch $@

# --capture=sys: a report from the pytest process itself reaches the terminal before it exits.
# The children (the crash replays, the fuzz) inherit the environment and run instrumented too.
sanitize: $(ASAN_VENV)/.ready
	$(ASAN_PY) -m pip install -q --no-build-isolation --no-deps --config-settings=build-dir=build/asan/cmake \
	  --config-settings=cmake.define.PYENGINE_SANITIZE=ON --config-settings=cmake.define.PYENGINE_CUDA=OFF .
	$(ASAN_ENV) $(ASAN_PY) -P -c "import pyengine._C as c; so = open(c.__file__, 'rb').read(); \
	  b'__asan_report' in so and b'__ubsan_handle' in so or exit(c.__file__ + ' is not instrumented')"
	$(ASAN_ENV) $(ASAN_VENV)/bin/pytest -q --capture=sys $(SANITIZE_TESTS)
	$(ASAN_ENV) PYENGINE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PYENGINE_FUZZ_RANDOM=1 \
	  $(ASAN_VENV)/bin/pytest -q -s tests/test_ops_safety.py -k fuzz

demo: build
	$(VENV)/bin/pyengine demo --out demo-out

bench: build
	$(PY) -P benchmarks/gram.py
	$(PY) -P benchmarks/probing.py
	$(PY) -P benchmarks/degeneracy.py
	$(PY) -P benchmarks/attribution.py
	$(PY) -P benchmarks/paths.py
	$(PY) -P benchmarks/topk.py

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --python $(PYTHON)

clean:
	rm -rf build demo-out .pytest_cache
