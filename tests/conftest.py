"""Shared fixtures. Root/BPF tests skip (with the reason printed) only where the machine
cannot run them; `make test` runs as root, so CI runs them."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "vm"))

import lab as vmlab
from netlab import IN_GUEST, Lab, skip_unless_root_bpf

collect_ignore = ["vm"]  # the lab's runner and its guest root filesystem hold no tests of ours


@pytest.fixture
def root_bpf() -> None:
    skip_unless_root_bpf("root BPF test")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Test hosts for one module, removed at its end."""
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the selected VM lab boots now, beside the host tests (tests/vm/lab.py says why)."""
    if os.geteuid() != 0 or os.environ.get("TFOWATCH_SYSTEMD_LAB") or session.config.option.collectonly:
        return
    jobs = [item.callspec.params.get("release", vmlab.SYSTEMD_JOB) if hasattr(item, "callspec")
            else vmlab.SYSTEMD_JOB for item in session.items if item.get_closest_marker("vm")]
    vmlab.start(jobs)


def pytest_sessionfinish(session: pytest.Session) -> None:
    vmlab.stop()


# Each verbose result line carries the wall time since the previous test ended (its fixtures'
# set-up included) and the run's elapsed time: CI's budget is read off its own output.
_RUN_START = _LAST_END = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_report_teststatus(report: pytest.TestReport) -> Generator[None, Any, None]:
    global _LAST_END
    outcome = yield
    category, letter, word = outcome.get_result()
    ends_test = report.when == "call" or (report.when == "setup" and not report.passed)
    if ends_test and isinstance(word, str) and word:
        now = time.monotonic()
        took, at = now - _LAST_END, now - _RUN_START
        _LAST_END = now
        outcome.force_result((category, letter, f"{word} [{took:.0f}s, at {at / 60:.1f} min]"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In a guest, a failure is printed as it happens: a guest killed at its time bound never
    reaches pytest's summary, and its failure would be lost."""
    terminal = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
    if IN_GUEST and report.failed and terminal is not None:
        terminal.write_line(f"\n--- {report.nodeid} ({report.when}) failed:\n{report.longreprtext}")


_CONFIG: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config
