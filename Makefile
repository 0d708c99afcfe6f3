# churnzero-relay: `make run` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install js run test unit integration lint fmt typecheck bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Segment's JavaScript clients for the integration tests (the tests run this too when
# tests/js/node_modules is missing or older than the lock file).
js:
	npm ci --prefix tests/js --no-audit --no-fund

run: install
	$(BIN)/relay dev

test: install
	$(BIN)/pytest -q --durations=15

# The fast inner loop: no plugin but those the unit tests use, so pytest does not rewrite
# the asserts of every plugin's package at each start; the slowest tests are printed.
UNIT_PLUGINS := -p pytest_asyncio.plugin -p pytest_aiohttp.plugin -p _hypothesis_pytestplugin \
	-p pytest_timeout
unit: install
	$(BIN)/pytest -q --durations=10 --disable-plugin-autoload $(UNIT_PLUGINS) tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check relay workers tests
	$(BIN)/ruff format --check relay workers tests
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format relay workers tests
	$(BIN)/ruff check --fix relay workers tests

chaos: install
	$(BIN)/pytest -q -m chaos -s tests/integration/test_chaos.py tests/integration/test_take.py tests/integration/test_sentinel.py

# Arguments for `python -m tests.bench`, e.g. BENCH="e2e --baseline b324a8f" or
# BENCH="e2e --profile" (py-spy: `.venv/bin/pip install py-spy`).
BENCH ?=
bench: install
	$(BIN)/python -m tests.bench $(BENCH)

clean:
	rm -rf $(VENV) .relay bench-results .pytest_cache .mypy_cache .ruff_cache tests/js/node_modules
