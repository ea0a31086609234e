# Two commands on a fresh machine with Python 3.11 + pip (no pixi needed):
#   make generate [ARGS="--prompt 'def forward' --max-new-tokens 16"]
#   make test     [ARGS="-k router"]
# Each creates .venv and installs the pinned requirements on first use; later runs skip that.
# make test-fast: config, weights, CLI errors, sampling, GGUF export and the kernels' fuzz tests; no whole-model compile.
# make test-scale: the real-dims Hy3 slice (tests/test_real_slice.py; ~17.6 GB of cache, ~10 minutes).
# make bench-peers: llama.cpp (llama-cpp-python, built from source: ~4-6 minutes on 2 cores once, then pip's cache).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: generate test test-fast test-scale bench bench-peers clean-venv

$(VENV)/.runtime-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

# GGML_NATIVE: llama.cpp for this CPU's instruction sets (AVX-512, AVX512_BF16, AMX where present), as its users build it.
$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.test-installed
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

generate: $(VENV)/.runtime-installed
	$(PY) -m hyv3_graph.generate $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest $(ARGS)

test-fast: $(VENV)/.test-installed
	$(PY) -m pytest -m "not slow" $(ARGS)

test-scale: $(VENV)/.test-installed
	$(PY) -m pytest -m scale -s $(ARGS)

bench-peers: $(VENV)/.bench-installed

bench: $(VENV)/.bench-installed
	$(PY) -m bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
