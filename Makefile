# One entry point for a fresh machine: `make test` builds .venv, installs everything, runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

test: install
	$(BIN)/python -m pytest -x -q tests

demo: install
	$(BIN)/python -m library.demo --output_dir demo_output

clean:
	rm -rf $(VENV)
