"""Turn decoded events into labelled counts, with bounded cardinality.

Each metric holds at most `series_cap` label sets; an event that would open one
more is folded into a series whose labels are all "other" and counted in
`dropped`. Memory is therefore bounded whatever the traffic (random ports,
short-lived processes, namespace churn).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from tfowatch.events import Event, EventType, RefuseReason
from tfowatch.metrics import (
    EVENT_METRIC,
    REFUSE_REASONS,
    TW_AGE_BUCKETS,
    TW_REUSE,
    TW_REUSE_AGE,
    Metric,
)

OTHER = "other"
Labels = tuple[str, ...]


def _refuse_reason(code: int) -> str:
    try:
        return REFUSE_REASONS[RefuseReason(code)]
    except ValueError:
        return "unknown"


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(TW_AGE_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(TW_AGE_BUCKETS, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class Snapshot:
    counters: dict[Metric, dict[Labels, int]]
    histograms: dict[Labels, Histogram]
    per_netns: dict[tuple[int, EventType], int]
    received: dict[EventType, int]
    dropped: dict[str, int]
    lost: int


class Aggregator:
    def __init__(self, series_cap: int = 1000) -> None:
        if series_cap < 1:
            raise ValueError("series cap must be at least 1")
        self.series_cap = series_cap
        self._lock = threading.Lock()
        self._counters: dict[Metric, dict[Labels, int]] = defaultdict(dict)
        self._hist: dict[Labels, Histogram] = {}
        self._per_netns: dict[tuple[int, EventType], int] = defaultdict(int)
        self._netns_seen: set[int] = set()
        self._received: dict[EventType, int] = defaultdict(int)
        self._dropped: dict[str, int] = defaultdict(int)
        self._lost = 0
        self._label_cache: dict[tuple[object, ...], Labels] = {}

    def _cached_labels(self, ev: Event) -> Labels:
        """labels(ev), memoised: most events repeat a few label sets. The cache is bounded
        like the series (emptied when it outgrows them)."""
        k = (ev.type, ev.netns, ev.port, ev.comm, ev.cgroup, ev.reason)
        labels = self._label_cache.get(k)
        if labels is None:
            if len(self._label_cache) >= 4 * self.series_cap:
                self._label_cache.clear()
            labels = self._label_cache[k] = self.labels(ev)
        return labels

    @staticmethod
    def labels(ev: Event) -> Labels:
        metric, reason = EVENT_METRIC[ev.type]
        values = {"netns": str(ev.netns), "port": str(ev.port), "comm": ev.comm, "cgroup": ev.cgroup,
                  "reason": reason or ""}
        if metric is TW_REUSE:
            granted = ev.type == EventType.TW_REUSE_GRANTED
            values["result"] = "granted" if granted else "refused"
            values["reason"] = "" if granted else _refuse_reason(ev.reason)
        return tuple(values[name] for name in metric.labels)

    def _bounded(self, metric_name: str, series: Mapping[Labels, object], key: Labels,
                 n: int = 1) -> Labels:
        if key in series or len(series) < self.series_cap:
            return key
        self._dropped[metric_name] += n
        return (OTHER,) * len(key)

    def add(self, ev: Event, n: int = 1) -> None:
        """Count `ev` n times (n > 1: an in-kernel count, never a TIME-WAIT event)."""
        if ev.type not in EVENT_METRIC:  # e.g. plain connects: doctor's, not a metric
            with self._lock:
                self._received[ev.type] += n
            return
        metric, _ = EVENT_METRIC[ev.type]
        with self._lock:
            key = self._cached_labels(ev)
            self._received[ev.type] += n
            series = self._counters[metric]
            key = self._bounded(metric.name, series, key, n)
            series[key] = series.get(key, 0) + n
            if metric is TW_REUSE:
                hkey = self._bounded(TW_REUSE_AGE.name, self._hist, (key[0], key[4]))
                self._hist.setdefault(hkey, Histogram()).observe(ev.age_ms / 1000.0)
            if ev.netns in self._netns_seen or len(self._netns_seen) < self.series_cap:
                self._netns_seen.add(ev.netns)
                self._per_netns[(ev.netns, ev.type)] += n

    def add_lost(self, count: int) -> None:
        with self._lock:
            self._lost += count

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                counters={m: dict(s) for m, s in self._counters.items()},
                histograms={k: Histogram(list(h.buckets), h.total, h.count)
                            for k, h in self._hist.items()},
                per_netns=dict(self._per_netns),
                received=dict(self._received),
                dropped=dict(self._dropped),
                lost=self._lost,
            )
