.DEFAULT_GOAL := help
PY ?= python3

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install jobq with test and dev extras (editable)
	$(PY) -m pip install -e ".[web,test,dev]"

format:  ## format the code
	$(PY) -m ruff check --fix jobq tests scripts
	$(PY) -m ruff format jobq tests scripts

lint:  ## lint and check formatting
	$(PY) -m ruff check jobq tests scripts
	$(PY) -m ruff format --check jobq tests scripts

typecheck:  ## mypy --strict over jobq/ and tests/typing_checks/
	$(PY) -m mypy

test:  ## the whole test suite (real redis-server)
	$(PY) -m pytest -q

test-unit:  ## unit tests only (no redis-server)
	$(PY) -m pytest -q tests/unit

check:  ## everything CI runs (installs what is missing)
	./scripts/check

.PHONY: docs
docs:  ## build the documentation site into site/ (needs the docs extra)
	$(PY) -m mkdocs build --strict

bench:  ## the benchmark (docs/performance.md)
	$(PY) scripts/bench

demo:  ## the quickstart: local redis, a worker, a batch of jobs
	$(PY) scripts/demo
