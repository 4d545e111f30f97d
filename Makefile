# Two commands: `make demo` (main job on a built-in zoo model) and `make test` (whole suite).
# Each creates .venv and installs everything it needs by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxopt demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check fxopt tests examples benchmarks

# make bench                      every script in benchmarks/ (long)
# make bench BENCH="--only latency"  one of them; BENCH=--list shows them
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
