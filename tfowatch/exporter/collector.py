"""Prometheus exposition of the daemon's state, built at scrape time from one snapshot.

Every family, its kind, help and labels come from the contract (metrics.py). A probe metric
appears only when the running tier provides it (absent, not zero, otherwise); `tfowatch
probes` tells which tier provides what. `families(st)` is a pure function of the state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import disable_created_metrics, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as Family,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from tfowatch.core import metrics as m
from tfowatch.core.aggregator import Histogram, Labels
from tfowatch.core.state import KERNEL, PROBES, SELF, ExportState
from tfowatch.exporter.shared import SharedBuild


def family(metric: m.Metric, value: float | None = None) -> Family:
    """An empty family of the contract's `metric` (or one unlabelled sample of `value`)."""
    labels = None if value is not None else list(metric.labels)
    if metric.kind == "counter":
        return CounterMetricFamily(metric.family, metric.help, value=value, labels=labels)
    if metric.kind == "gauge":
        return GaugeMetricFamily(metric.family, metric.help, value=value, labels=labels)
    return HistogramMetricFamily(metric.family, metric.help, labels=labels)


def _histogram(metric: m.Metric, series: dict[Labels, Histogram]) -> Family:
    fam = HistogramMetricFamily(metric.family, metric.help, labels=list(metric.labels))
    for labels, h in sorted(series.items()):
        running, buckets = 0, []
        for bound, n in zip([*h.bounds, float("inf")], h.buckets, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
        fam.add_metric(list(labels), buckets, h.total)
    return fam


def _samples(metric: m.Metric, samples: Iterable[tuple[Iterable[str], float]]) -> Family:
    fam: CounterMetricFamily | GaugeMetricFamily = family(metric)  # type: ignore[assignment]
    for labels, value in samples:
        fam.add_metric(list(labels), value)
    return fam


def probe_families(st: ExportState, counters: bool = True) -> Iterator[Family]:
    """The tier's probe families (counters only if `counters`: ProbeText writes them faster)."""
    if not st.ok(PROBES):
        return
    for metric in st.plan.metrics:
        if metric.kind == "histogram":
            yield _histogram(metric, st.snap.histograms.get(metric, {}))
        elif counters:
            yield _samples(metric, sorted(st.snap.counters.get(metric, {}).items()))


def kernel_families(st: ExportState) -> Iterator[Family]:
    if not st.ok(KERNEL):
        return
    yield _samples(m.KERNEL_TCPEXT, (([str(ino), name], value) for ino, counters in sorted(st.kernel.items())
                                     for name, value in sorted(counters.items())))
    yield family(m.NETNS_UNREADABLE, st.unreadable)
    yield _samples(m.NETNS_RETIRED, (([why], st.retired.get(why, 0)) for why in m.RETIRED_REASONS))
    if st.plan.reconciled and st.ok(PROBES):
        yield _samples(m.RECONCILE_DRIFT, (([str(ino), label], value)
                                           for (ino, label), value in sorted(st.drift.items())))
    if st.plan.tier in m.SYN_DATA_PENDING.tiers and st.ok(PROBES):  # empty unless outcomes_at_close
        yield _samples(m.SYN_DATA_PENDING, (([str(ino)], n) for ino, n in sorted(st.pending.items()) if n))
    if st.plan.tier in m.ACTIVE_TFO_DISABLES.tiers:  # read in the kernel part, like TcpExt
        yield from blackhole_families(st)


def blackhole_families(st: ExportState) -> Iterator[Family]:
    now = time.monotonic_ns()  # the programs' bpf_ktime_get_ns() clock
    states = sorted(st.blackholes.items())
    timed = [(str(ino), b) for ino, b in states if b.timed]
    yield _samples(m.ACTIVE_TFO_DISABLES, (([str(ino)], b.times) for ino, b in states))
    yield _samples(m.ACTIVE_TFO_DISABLED, (([ino], int(b.disabled(now))) for ino, b in timed))
    yield _samples(m.ACTIVE_TFO_REENABLE, (([ino], b.reenable_in(now)) for ino, b in timed))
    yield _samples(m.ACTIVE_TFO_DISABLED_AT, (([ino], b.since_unix(now)) for ino, b in timed))


def self_families(st: ExportState) -> Iterator[Family]:
    if st.ok(SELF):
        yield _samples(m.PROBE_ATTACHED, ((att[:3], 1 if att[3] else 0) for att in st.attached))
    if st.totals is not None and st.ok(PROBES):
        totals = st.totals
        yield _samples(m.EVENTS, (([t.name.lower()], totals[t]) for t in sorted(st.plan.events)))
        yield family(m.EVENTS_LOST, st.snap.lost)
        yield family(m.LATE_EVENTS, st.late)
    if st.plan.metrics and st.ok(PROBES):
        served = st.plan.metrics
        yield _samples(m.SERIES_DROPPED, (([f.name], st.snap.dropped.get(f.name, 0)) for f in served))
        yield _samples(m.SERIES_EXPIRED, (([f.name], st.snap.expired.get(f.name, 0)) for f in served))
        yield _samples(m.SERIES, (([f.name], len(st.snap.series(f))) for f in served))
    if st.plan.tier in m.KERNEL_HZ.tiers:
        yield _samples(m.KERNEL_HZ, [([st.hz[1]], st.hz[0])])
    if st.plan.tier in m.LISTENERS_UNWATCHED.tiers:
        yield family(m.LISTENERS_UNWATCHED, st.unwatched)
    yield family(m.SERIES_CAP, st.series_cap)
    yield family(m.SERIES_CAP_PER_NETNS, st.netns_limit)
    plan, why = st.plan, st.plan.degraded
    yield _samples(m.BUILD_INFO, [([st.version, st.kernel_release, plan.mode, plan.tier,
                                    plan.planned_tier], 1)])
    yield _samples(m.TIER_DEGRADED, [([plan.planned_tier, plan.tier, why.reason if why else ""],
                                      1 if why else 0)])
    if st.parts:
        yield _samples(m.SCRAPE_PART_SUCCESS, (([name], int(part.ok)) for name, part in st.parts.items()))
        yield _samples(m.SCRAPE_PART_DURATION, (([name], part.seconds) for name, part in st.parts.items()))


def families(st: ExportState, counters: bool = True) -> Iterator[Family]:
    yield from probe_families(st, counters)
    yield from kernel_families(st)
    yield from self_families(st)


class TfoCollector(Collector):
    """Every family of the state `state()` returns, through prometheus_client."""

    def __init__(self, state: Callable[[], ExportState]) -> None:
        self._state = state

    def describe(self) -> list[Family]:
        return []  # families depend on the tier: collect at scrape time only

    def collect(self) -> Iterator[Family]:
        return families(self._state())


class _Fixed:
    """What generate_latest reads: families already built."""

    def __init__(self, fams: Iterable[Family]) -> None:
        self._fams = fams

    def collect(self) -> Iterable[Family]:
        return self._fams


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


class ProbeText:
    """The probe counter families in the text format (0.0.4), as prometheus_client would
    write them (tests/unit/test_exporter.py compares the two), but with each series' line
    kept with its value: per scrape only the lines of series whose value moved are written
    again, which is what makes a 10k-series scrape take milliseconds (docs/PERFORMANCE.md)."""

    def __init__(self) -> None:
        # (name, labels) -> (value, its line, length of the line's `name{...} ` prefix)
        self._lines: dict[tuple[str, Labels], tuple[float, str, int]] = {}

    def _line(self, key: tuple[str, Labels], labelnames: tuple[str, ...], value: float) -> str:
        kept = self._lines.get(key)
        if kept is not None:
            prefix = kept[1][:kept[2]]
        else:
            if len(self._lines) > 100_000:  # label sets come and go (namespaces, processes)
                self._lines.clear()
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(zip(labelnames, key[1], strict=True)))
            prefix = f"{key[0]}{{{pairs}}} "
        line: str = prefix + floatToGoString(value) + "\n"  # type: ignore[no-untyped-call]
        self._lines[key] = (value, line, len(prefix))
        return line

    def render(self, st: ExportState) -> str:
        out: list[str] = []
        lines = self._lines
        for metric in st.plan.metrics if st.ok(PROBES) else []:
            if metric.kind != "counter":
                continue
            name = metric.name
            help_text = metric.help.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n")
            for labels, value in st.snap.counters.get(metric, {}).items():
                kept = lines.get((name, labels))
                out.append(kept[1] if kept is not None and kept[0] == value
                           else self._line((name, labels), metric.labels, value))
        return "".join(out)


class Scrape:
    """The /metrics answer from one state: the probe counters written by ProbeText, every
    other family by prometheus_client, then `registry`'s (the process and the HTTP server).
    Scrapes at once share builds (SharedBuild), which also keeps ProbeText's cache to one
    builder at a time."""

    def __init__(self, state: Callable[[], ExportState]) -> None:
        # *_created series would double the exposition, and no dashboard or alert uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(namespace="tfowatch", registry=self.registry)
        self._state = state
        self._text = ProbeText()
        self._shared = SharedBuild(self._build)

    def _build(self) -> bytes:
        st = self._state()
        return (self._text.render(st).encode()
                + generate_latest(_Fixed(list(families(st, counters=False))))
                + generate_latest(self.registry))

    def render(self, gzipped: bool = False) -> bytes:
        answer = self._shared.get()
        return answer.gzipped() if gzipped else answer.text
