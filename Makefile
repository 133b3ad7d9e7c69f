# `make run`: set up this machine and run the daemon. `make test`: set up and run every test.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
ARGS      ?=

.PHONY: all setup host run test test-quick lint clean

all: test

setup: host $(STAMP)

host:
	@[ "$$(id -u)" = 0 ] || { echo "make: run as root (apt and BPF need it)" >&2; exit 1; }
	@scripts/setup-host.sh

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/tfowatch run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check tfowatch tests
	$(VENV)/bin/mypy

# The whole suite: lint, unit, BPF verifier, host integration (tracepoint tier).
test: setup lint
	$(VENV)/bin/pytest -v -rs tests

test-quick: setup
	$(VENV)/bin/pytest -q -rs tests

clean:
	rm -rf $(VENV) *.egg-info
