# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The test suite compares instar with the real qemu-img: without it, it fails (not skips).
REQUIRE_QEMU ?= 1

.PHONY: setup bytecode qemu demo test lint bench clean

setup: $(VENV)/.installed bytecode

# Compiled bytecode for instar's modules, written even where PYTHONDONTWRITEBYTECODE
# is set: without it every run compiles them again (tens of milliseconds).
bytecode: $(VENV)/.installed
	$(PY) -m compileall -q src/instar

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Install qemu-utils (the reference qemu-img) when it is missing and we are root.
# With REQUIRE_QEMU=0 a failed install is only a warning: the parity tests then skip.
qemu:
	@command -v qemu-img >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils; } \
	    || { echo "could not install qemu-utils" >&2; [ "$(REQUIRE_QEMU)" = 0 ]; }; \
	  else echo "qemu-img is missing: install qemu-utils" >&2; fi; }

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy

test: setup qemu lint
	INSTAR_REQUIRE_QEMU=$(REQUIRE_QEMU) $(PY) -m pytest -n 2 tests

bench: setup qemu
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) demo-out bench/out
