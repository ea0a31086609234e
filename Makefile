# Two commands on a fresh machine with Python 3.11 + pip (no pixi needed):
#   make generate [ARGS="--prompt 'def forward' --max-new-tokens 16"]
#   make test     [ARGS="-k router"]
# Each creates .venv and installs the pinned requirements on first use; later runs skip that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: generate test bench clean-venv

$(VENV)/.runtime-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

generate: $(VENV)/.runtime-installed
	$(PY) -m hyv3_graph.generate $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.test-installed
	$(PY) -m bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
