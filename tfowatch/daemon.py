"""`tfowatch run`: attach the plan's probes, aggregate events, serve /metrics."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from tfowatch import __version__
from tfowatch.aggregator import Aggregator
from tfowatch.btf import Btf, BtfError
from tfowatch.cgroups import CgroupNames
from tfowatch.events import decode
from tfowatch.exporter import ExportState, TfoCollector, serve
from tfowatch.kernel import KernelFacts, detect
from tfowatch.plan import Plan, PlanError, fall_back, resolve
from tfowatch.reconcile import KernelCounters, drift

log = logging.getLogger(__name__)
POLL_MS = 50


@dataclass
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 19135
    mode: str = "auto"
    series_cap: int = 1000
    perf_pages: int = 256


def load_plan(facts: KernelFacts, mode: str) -> tuple[Plan, Any]:
    """Resolve and attach, falling one tier down per failure in auto mode."""
    from tfowatch.bpfprog import LoadError, Probes

    plan = resolve(facts, mode)
    while plan.tier != "counters":
        try:
            btf = Btf.load()
            probes = Probes(plan, btf)
            probes.attach()
            return plan, probes
        except (LoadError, BtfError) as exc:
            if mode != "auto":
                raise PlanError(str(exc)) from exc
            log.warning("%s tier unavailable (%s); falling back", plan.tier, exc)
            plan = fall_back(plan, facts)
            plan.mode = mode
    return plan, None


class Daemon:
    def __init__(self, settings: Settings, facts: KernelFacts | None = None) -> None:
        self.settings = settings
        self.facts = facts or detect()
        self.plan, self.probes = load_plan(self.facts, settings.mode)
        self.agg = Aggregator(settings.series_cap)
        self.counters = KernelCounters(max_namespaces=settings.series_cap)
        self.cgroups = CgroupNames()
        self._gen = 0
        self._cond = threading.Condition()
        self._server: Any = None
        if self.probes is not None:
            self.probes.open_events(self._on_event, self.agg.add_lost, settings.perf_pages)
        self.counters.start()

    def _on_event(self, _cpu: int, data: Any, _size: int) -> None:
        ev = decode(data)
        if ev.cgroup_id:
            ev = replace(ev, cgroup=self.cgroups.name(ev.cgroup_id, ev.pid))
        self.agg.add(ev)

    def serve(self) -> None:
        collector = TfoCollector(self.state)
        self._server = serve(collector, self.settings.listen_host, self.settings.listen_port)

    def poll_once(self) -> None:
        if self.probes is not None:
            self.probes.poll(POLL_MS)
        else:
            time.sleep(POLL_MS / 1000)
        with self._cond:
            self._gen += 1
            self._cond.notify_all()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll_once()

    def drain(self, timeout: float = 1.0) -> None:
        """Wait until the poller has read everything submitted before this call."""
        with self._cond:
            target = self._gen + 2
            self._cond.wait_for(lambda: self._gen >= target, timeout=timeout)

    def attached(self) -> list[tuple[str, str, str, bool]]:
        out = []
        for r in self.plan.points:
            for a in r.attachments:
                ok = self.probes is not None and self.probes.attached.get(a, False)
                out.append((r.point, f"{a.kind}:{a.target}", r.tier, ok))
        return out

    def state(self) -> ExportState:
        self.drain()
        snap = self.agg.snapshot()
        kernel = self.counters.read()
        return ExportState(
            plan=self.plan, snap=snap,
            totals=self.probes.totals() if self.probes is not None else None,
            kernel=kernel,
            drift=drift(snap, self.counters.deltas(kernel), self.plan.reconciled),
            attached=self.attached(), version=__version__, kernel_release=self.facts.release,
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.probes is not None:
            self.probes.close()
