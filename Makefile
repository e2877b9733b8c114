# Every target creates .venv and installs the project when missing, so a fresh
# clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
# `make demo` needs only the runtime dependencies: it installs those alone (its own
# stamp), so a first demo does not wait for the test and lint toolchain.
RUNTIME_STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

demo: $(RUNTIME_STAMP)
	$(PY) -m proxy demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	if [ -x $(VENV)/bin/hadolint ]; then $(VENV)/bin/hadolint Dockerfile; fi

bench: $(VENV)/.installed-bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
