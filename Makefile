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
	@scripts/setup-vm-lab.sh

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/tfowatch run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The whole suite: lint, unit, BPF verifier, host integration (tracepoint tier), and the
# VM kernel lab (kprobe tier on Debian 6.1 and 6.12 under qemu, ~3 min per kernel).
test: setup lint
	$(VENV)/bin/pytest -v -rs tests

# Everything but the VM lab, for iteration.
test-quick: setup
	$(VENV)/bin/pytest -q -rs -m "not vm" tests

clean:
	rm -rf $(VENV) *.egg-info
