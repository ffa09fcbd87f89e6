# The README's two commands, `make serve` and `make test`, do all the set-up on a fresh machine:
# a pinned uv in .tools/, the locked environment in .venv/, the Node SDK check's packages.

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

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund
	touch $@

setup: .venv/.synced

serve: setup
	$(VENV)/dubhe serve

test: lint tests/node/node_modules/.installed
	$(VENV)/python -m pytest -n 4 --dist loadfile

lint: setup
	$(VENV)/ruff check src tests bench
	$(VENV)/mypy

bench: setup
	$(VENV)/python bench/run.py

clean:
	rm -rf .venv .tools tests/node/node_modules
