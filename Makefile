# Two entry points: `make demo` (install + the fitness-club demo) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test check bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

demo: install
	$(BIN)/touchpoints check
	$(BIN)/touchpoints demo

test: install-test
	$(BIN)/touchpoints check
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check engine channels tests bench
	$(BIN)/mypy

bench: install-test
	$(BIN)/python bench/tick.py

clean:
	rm -rf var build *.egg-info
