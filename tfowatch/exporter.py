"""Prometheus exposition of the daemon's state, built at scrape time.

A probe metric appears only when the running tier provides it (absent, not zero,
otherwise); `tfowatch probes` tells which tier provides what.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import disable_created_metrics, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from tfowatch.aggregator import Labels, Snapshot
from tfowatch.events import EventType
from tfowatch.metrics import TW_AGE_BUCKETS, TW_REUSE_AGE
from tfowatch.plan import Plan


@dataclass
class ExportState:
    plan: Plan
    snap: Snapshot
    totals: list[int] | None  # exact per-type counts from the kernel; None without BPF
    kernel: dict[int, dict[str, int]]
    unreadable: int  # namespaces found whose counters this process may not read
    drift: dict[tuple[int, str], int]
    attached: list[tuple[str, str, str, bool]]  # point, target, tier, attached
    version: str
    kernel_release: str
    series_cap: int


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


class TfoCollector(Collector):
    """Every family, through prometheus_client; with `pinned` set (a Scrape in progress),
    the state of that scrape and no probe counters, which the Scrape renders itself."""

    def __init__(self, state: Callable[[], ExportState]) -> None:
        self._state = state
        self.pinned: ExportState | None = None

    def describe(self) -> list[Metric]:
        return []  # families depend on the tier: collect at scrape time only

    def collect(self) -> Iterator[Metric]:
        st = self.pinned or self._state()
        yield from self._probe_metrics(st, counters=self.pinned is None)
        yield from self._kernel_metrics(st)
        yield from self._self_metrics(st)

    def _probe_metrics(self, st: ExportState, counters: bool = True) -> Iterator[Metric]:
        for m in st.plan.metrics:
            if m is TW_REUSE_AGE:
                yield self._age_histogram(st)
                continue
            if not counters:
                continue
            fam = _counter(m.name, m.help, list(m.labels))
            for labels, value in sorted(st.snap.counters.get(m, {}).items()):
                fam.add_metric(list(labels), value)
            yield fam

    @staticmethod
    def _age_histogram(st: ExportState) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(TW_REUSE_AGE.name, TW_REUSE_AGE.help,
                                    labels=list(TW_REUSE_AGE.labels))
        for labels, h in sorted(st.snap.histograms.items()):
            running, buckets = 0, []
            for bound, n in zip([*TW_AGE_BUCKETS, float("inf")], h.buckets, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
            fam.add_metric(list(labels), buckets, h.total)
        return fam

    @staticmethod
    def _kernel_metrics(st: ExportState) -> Iterator[Metric]:
        fam = _counter("tfowatch_kernel_tcpext_total",
                       "The kernel's own TcpExt TFO and TIME-WAIT counters, per network namespace.",
                       ["netns", "counter"])
        for ino, counters in sorted(st.kernel.items()):
            for name, value in sorted(counters.items()):
                fam.add_metric([str(ino), name], value)
        yield fam
        yield GaugeMetricFamily("tfowatch_netns_unreadable",
                                "Network namespaces found whose counters tfowatch may not read "
                                "(process-less ones need CAP_SYS_ADMIN).", value=st.unreadable)
        if st.plan.reconciled:
            drift = GaugeMetricFamily(
                "tfowatch_reconcile_drift",
                "Probe-derived count minus the kernel counter's increase since start (0 = exact).",
                labels=["netns", "metric"])
            for (ino, label), value in sorted(st.drift.items()):
                drift.add_metric([str(ino), label], value)
            yield drift

    @staticmethod
    def _self_metrics(st: ExportState) -> Iterator[Metric]:
        att = GaugeMetricFamily("tfowatch_probe_attached",
                                "1 when the probe is attached, per design-card point and target.",
                                labels=["point", "target", "tier"])
        for point, target, tier, ok in st.attached:
            att.add_metric([point, target, tier], 1 if ok else 0)
        yield att
        if st.totals is not None:
            ev = _counter("tfowatch_events", "Events reported by the kernel programs, by type.", ["type"])
            for t in EventType:
                ev.add_metric([t.name.lower()], st.totals[t])
            yield ev
            yield CounterMetricFamily("tfowatch_events_lost",
                                      "Events the perf buffer dropped before tfowatch read them.",
                                      value=st.snap.lost)
        dropped = _counter("tfowatch_series_dropped",
                           "Events folded into the 'other' series because a metric hit its series cap.",
                           ["metric"])
        for name, n in sorted(st.snap.dropped.items()):
            dropped.add_metric([name], n)
        yield dropped
        series = GaugeMetricFamily("tfowatch_series", "Label sets each probe metric holds now "
                                   "(at most tfowatch_series_cap, plus one 'other').", labels=["metric"])
        for m in st.plan.metrics:
            held = st.snap.histograms if m is TW_REUSE_AGE else st.snap.counters.get(m, {})
            series.add_metric([m.name], len(held))
        yield series
        yield GaugeMetricFamily("tfowatch_series_cap", "Label sets a metric may hold (series_cap).",
                                value=st.series_cap)
        info = GaugeMetricFamily("tfowatch_build_info", "tfowatch version, kernel, probe mode, the "
                                 "tier running and the tier planned for this kernel and mode.",
                                 labels=["version", "kernel", "mode", "tier", "planned_tier"])
        info.add_metric([st.version, st.kernel_release, st.plan.mode, st.plan.tier,
                         st.plan.planned_tier], 1)
        yield info
        degraded = GaugeMetricFamily("tfowatch_tier_degraded",
                                     "1 when a lower tier runs than planned (the planned one could "
                                     "not be loaded or attached), with why; 0 otherwise.",
                                     labels=["planned_tier", "tier", "reason"])
        why = st.plan.degraded
        degraded.add_metric([st.plan.planned_tier, st.plan.tier, why.reason if why else ""],
                            1 if why else 0)
        yield degraded


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


class ProbeText:
    """The probe counter families in the text format (0.0.4), as prometheus_client would
    write them (tests/test_exporter.py compares the two), but with each label set's
    `name{...}` written once and kept: per scrape only the values are formatted, which is
    what makes a 10k-series scrape take milliseconds (docs/PERFORMANCE.md)."""

    def __init__(self) -> None:
        self._prefix: dict[tuple[str, Labels], str] = {}

    def _line_prefix(self, name: str, labelnames: tuple[str, ...], labels: Labels) -> str:
        if len(self._prefix) > 100_000:  # label sets come and go (namespaces, processes)
            self._prefix.clear()
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(zip(labelnames, labels, strict=True)))
        prefix = self._prefix[(name, labels)] = f"{name}{{{pairs}}} "
        return prefix

    def render(self, st: ExportState) -> str:
        out: list[str] = []
        for m in st.plan.metrics:
            if m is TW_REUSE_AGE:
                continue
            help_text = m.help.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {m.name} {help_text}\n# TYPE {m.name} counter\n")
            for labels, value in st.snap.counters.get(m, {}).items():
                prefix = self._prefix.get((m.name, labels)) or self._line_prefix(m.name, m.labels, labels)
                out.append(prefix + floatToGoString(value) + "\n")  # type: ignore[no-untyped-call]
        return "".join(out)


class Scrape:
    """One /metrics answer: the state is taken once; the probe counters are rendered by
    ProbeText, everything else by prometheus_client from the same state."""

    def __init__(self, state: Callable[[], ExportState]) -> None:
        self.collector = TfoCollector(state)
        self.registry = registry(self.collector)
        self._state = state
        self._text = ProbeText()
        self._lock = threading.Lock()  # one scrape at a time: they share `pinned`

    def render(self) -> bytes:
        with self._lock:
            st = self.collector.pinned = self._state()
            try:
                return self._text.render(st).encode() + generate_latest(self.registry)
            finally:
                self.collector.pinned = None


def registry(collector: TfoCollector) -> CollectorRegistry:
    """The registry /metrics serves: tfowatch's metrics and the daemon's own process_* ones."""
    # *_created series would double the exposition, and no dashboard or alert uses them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    reg = CollectorRegistry()
    reg.register(collector)
    ProcessCollector(namespace="tfowatch", registry=reg)
    return reg
