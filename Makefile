.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_PATHS := outbox tests $(wildcard bench)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install outbox with its dev tools

# Two worker processes (pytest-xdist), each test file whole on one of them (its module-scoped
# servers start once): most tests wait on PostgreSQL or HTTP, so two halve the wall time on a
# two-core machine. PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2

test: $(STAMP) ## run the test suite (embedded Postgres, or OUTBOX_TEST_DATABASE_URL)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

chaos: $(STAMP) ## the full chaos run: kill -9, a Postgres restart, a Partnero outage (~1 min)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

demo: $(STAMP) ## run the whole thing on a throwaway Postgres and a fake Partnero, then report
	$(BIN)/outbox demo

lint: $(STAMP) ## ruff, mypy (strict on outbox/), import-linter
	$(BIN)/ruff check $(PY_PATHS)
	$(BIN)/ruff format --check $(PY_PATHS)
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(PY_PATHS)
	$(BIN)/ruff format $(PY_PATHS)

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## benchmarks, side by side with pgqueuer (~12 min; BENCH_ARGS=--quick: < 1 min)
	$(BIN)/python -m bench $(BENCH_ARGS)

dist: $(STAMP) ## build the wheel and the sdist into dist/ (partnero_outbox-VERSION-*)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

dist-check: dist ## install the built wheel into a clean venv and run it (CI does, once)
	OUTBOX_DIST_CHECK=1 OUTBOX_DIST_WHEEL=$$(ls dist/partnero_outbox-*.whl) $(BIN)/pytest -q tests/test_dist.py

runbook: $(STAMP) ## as root: follow systemd/README.md in a booted Debian 12 container (~40 s; ~2 min the first time)
	$(BIN)/python -m tests.runbook $(RUNBOOK_ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist

.PHONY: help install test chaos demo lint format bench dist dist-check runbook clean
