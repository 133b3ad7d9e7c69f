"""Helpers the tests share that need no test hosts (those are netlab's): the recorded kernel
facts, a fixed exporter state, and the command line run as a user would run it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from netlab import TFOWATCH

from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import EV_TYPE_MAX
from tfowatch.core.kernel import KernelFacts
from tfowatch.core.plan import Plan
from tfowatch.core.reconcile import drift
from tfowatch.core.state import KERNEL, PROBES, SELF, ExportState, Part

FACTS_DIR = Path(__file__).parent / "facts"


def facts(release_prefix: str) -> KernelFacts:
    """The facts recorded from a kernel (tests/facts/), by the start of its release."""
    (path,) = [p for p in FACTS_DIR.glob("*.json") if p.name.startswith(release_prefix)]
    return KernelFacts.from_json(Path(path).read_text())


def export_state(plan: Plan, agg: Aggregator, kernel: dict[int, dict[str, int]]) -> ExportState:
    """A daemon's state for `plan`: `agg`'s series, `kernel` as the namespaces' counters
    (baseline 0: namespaces created after start), every part read."""
    snap = agg.snapshot()
    return ExportState(plan=plan, snap=snap, totals=[0] * EV_TYPE_MAX, kernel=kernel, unreadable=0,
                       retired={}, late=0,
                       drift=drift(snap, kernel, plan.reconciled),
                       attached=[("tcp_twsk_unique", "kprobe:tcp_twsk_unique", "kprobe", True)],
                       version="0.1.0", kernel_release="6.1.0-56-amd64", series_cap=agg.series_cap,
                       netns_limit=agg.netns_limit,
                       parts={p: Part(True, 0.001) for p in (PROBES, KERNEL, SELF)})


def tfowatch(*args: str, env: dict[str, str] | None = None, pre: list[str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """The installed command (the venv's), `pre` wrapping it (e.g. setpriv)."""
    return subprocess.run([*(pre or []), str(TFOWATCH), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def one_line_error(res: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    """A clear one-line error with the documented exit code, never a traceback."""
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfowatch: "), res.stderr
    assert words in lines[0]
