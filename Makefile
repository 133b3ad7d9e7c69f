# `make run`: set up this machine and run the daemon. `make test`: set up and run every test.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
ARGS      ?=

.PHONY: all setup host run test test-quick test-unit lint clean install bench

# `make install`: tfowatch in its own venv (BCC comes from the distribution's python3-bpfcc),
# the systemd unit, and a config that is never overwritten. Paths can be moved, e.g. for a test.
PREFIX     ?= /usr/local
LIBDIR     ?= /opt/tfowatch
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system

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
	$(VENV)/bin/pytest -v -rs --durations=25 tests

# Everything but the VM lab and the soak, for iteration.
test-quick: setup
	$(VENV)/bin/pytest -q -rs -m "not vm and not soak" tests

# tests/unit, which needs neither root nor BPF, run as nobody to prove it: ~5 s.
test-unit: setup
	setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
		$(VENV)/bin/pytest -q -rs -p no:cacheprovider tests/unit

# `make bench`: the benchmarks on this host (its best tier), with the Python load generator
# and with the C one (bench/loadgen.c: no interpreter between the load and the kernel; it
# also runs tfowatch at saturation for 10 minutes, its memory sampled), the price of each
# kind of work in a sock_ops program (bench/primitives.py) and of each of its callbacks
# (bench/callbacks.py, in the sockops tier), then in each VM lab kernel
# (kprobe tier, ~20 min each under emulation); results in bench/results/, tables in
# docs/PERFORMANCE.md. BENCH_ARGS go to the host runs, e.g. BENCH_ARGS="--reps 3".
BENCH_ARGS ?=
HOST_TIER = $$($(VENV)/bin/tfowatch probes --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["tier"])')
bench: setup
	$(PY) bench/run.py --soak 0 --label "Host ($(HOST_TIER) tier)" --json bench/results/host.json $(BENCH_ARGS)
	$(PY) bench/run.py --load c --label "Host ($(HOST_TIER) tier), C load generator" \
		--json bench/results/host-c.json $(BENCH_ARGS)
	$(PY) bench/primitives.py > bench/results/primitives.md
	[ "$(HOST_TIER)" != sockops ] || $(PY) bench/callbacks.py > bench/results/callbacks.md
	for rel in $$(grep -v '^#' tests/vm/kernels.txt); do \
		$(PY) tests/vm/lab.py --bench $$rel tests/vm/out/bench-$$rel || exit 1; done
	$(PY) bench/report.py
	@echo "results: bench/results/*.json; table: docs/PERFORMANCE.md"

install:
	@[ "$$(id -u)" = 0 ] || { echo "make: install as root" >&2; exit 1; }
	@scripts/setup-host.sh --runtime
	/usr/bin/python3 -m venv --system-site-packages $(LIBDIR)
	rm -rf build  # setuptools would carry stale modules from an earlier build into the wheel
	$(LIBDIR)/bin/pip install -q .
	install -d $(PREFIX)/bin $(PREFIX)/share/doc/tfowatch $(SYSCONFDIR)/tfowatch $(SYSCONFDIR)/default \
		$(UNITDIR)/tfowatch.service.d
	ln -sfn $(LIBDIR)/bin/tfowatch $(PREFIX)/bin/tfowatch
	install -m 0644 README.md docs/DEPLOYMENT.md $(PREFIX)/share/doc/tfowatch/
	sed -e 's|/usr/local|$(PREFIX)|g' -e 's|/etc/|$(SYSCONFDIR)/|g' deploy/systemd/tfowatch.service \
		> $(UNITDIR)/tfowatch.service
	[ -e $(SYSCONFDIR)/tfowatch/tfowatch.toml ] || install -m 0600 deploy/systemd/tfowatch.toml $(SYSCONFDIR)/tfowatch/
	[ -e $(SYSCONFDIR)/default/tfowatch ] || install -m 0644 deploy/systemd/tfowatch.default $(SYSCONFDIR)/default/tfowatch
	@# RestartSteps/RestartMaxDelaySec exist from systemd 254 on; older ones would warn.
	[ "$$(systemctl --version | awk 'NR==1 {print $$2}')" -lt 254 ] || \
		install -m 0644 deploy/systemd/dropins/restart-backoff.conf $(UNITDIR)/tfowatch.service.d/
	$(PREFIX)/bin/tfowatch run --config $(SYSCONFDIR)/tfowatch/tfowatch.toml --check-config
	[ ! -d /run/systemd/system ] || systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now tfowatch"

clean:
	rm -rf $(VENV) *.egg-info build
