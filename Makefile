# edgefl: `make demo` and `make test` create .venv and install the pinned set first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test bench lock clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "edgefl needs Python 3.11 (TensorFlow Federated 0.87 supports < 3.12); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: install
	$(BIN)/edgefl demo

test: install browser
	$(BIN)/python -m pytest

# The dashboard test drives Debian's headless Chromium; install it when absent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

bench: install
	$(BIN)/python benchmarks/e2e_vs_tff.py
	$(BIN)/python benchmarks/coordinator_load.py

# Re-resolve requirements.txt from requirements.in (see the overrides there).
lock:
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile requirements.in --override overrides.txt --python-version 3.11 --python-platform x86_64-manylinux_2_31 -o requirements.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
