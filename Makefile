# One entry point for a fresh machine: `make test` builds .venv, installs everything, runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again only when setup.py is newer (or .venv was removed).
INSTALLED := $(VENV)/.installed

.PHONY: test lint install demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install torch==2.13.0

$(INSTALLED): setup.py | $(BIN)/python
	$(BIN)/pip install -e ".[test]"
	touch $@

install: $(INSTALLED)

# No -x: CI reports every failure of the suite, not only the first.
test: install
	$(BIN)/python -m pytest -q tests

# ruff.toml says what is checked: errors that break or mislead, not style.
lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/python -m library.demo --output_dir demo_output

clean:
	rm -rf $(VENV)
