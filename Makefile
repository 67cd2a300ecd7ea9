# edgefl: `make demo` and `make test` create .venv and install the pinned set first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install debian-packages demo test test-fast check bench lock clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "edgefl needs Python 3.11 (TensorFlow Federated 0.87 supports < 3.12); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: install
	$(BIN)/edgefl demo

# The project's own checks first (lint, format, the import contracts in pyproject.toml),
# then every test, in a random order
# (pytest-randomly; its seed is printed, and -p no:randomly turns it off).
test: install debian-packages check
	$(BIN)/python -m pytest --durations=15

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# The unit, API and hostile-input tests, without the ones that start real processes,
# fuzz the API or SIGKILL coordinators (a few minutes instead of ten).
test-fast: install debian-packages check
	$(BIN)/python -m pytest -m "not e2e and not slow"

# What the tests run from Debian, installed when absent: headless Chromium (the
# dashboard test), PostgreSQL's programs (the store's tests start their own server;
# the cluster Debian's package may start on install is stopped) and the real
# Fashion-MNIST (--dataset fashion-mnist, in /usr/share/datasets/fashion-mnist/).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
debian-packages:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql >/dev/null && \
		pg_lsclusters -h | while read version cluster rest; do $(SUDO) pg_ctlcluster --force "$$version" "$$cluster" stop >/dev/null 2>&1 || true; done; }
	@test -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

bench: install
	$(BIN)/python benchmarks/e2e_vs_tff.py
	$(BIN)/python benchmarks/coordinator_load.py
	$(BIN)/python benchmarks/export.py
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/hostile.py
	$(BIN)/python benchmarks/fleet.py

# Re-resolve requirements.txt from requirements.in (see the overrides there).
lock:
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile requirements.in --override overrides.txt --python-version 3.11 --python-platform x86_64-manylinux_2_31 -o requirements.txt

clean:
	rm -rf $(VENV) .flower-venv runs .pytest_cache
