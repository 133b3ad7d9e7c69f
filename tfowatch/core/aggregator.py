"""Turn decoded events into labelled counts, with bounded cardinality.

Which families an event feeds, with which labels, is the event table's (events.EVENTS); a
histogram family observes the event's value. Each family holds at most `series_cap` label
sets; an event that would open one more is folded into a series whose labels are all "other"
and counted in `dropped`. Memory is therefore bounded whatever the traffic (random ports,
short-lived processes, namespace churn). One namespace holds at most `netns_share` percent of
them: beyond it, its events fold into its own "other" series (its `netns`, every other label
"other"), so a noisy namespace cannot starve the others, and stays attributed. A series that
has not moved for `ttl` seconds is removed (`expire`, counted in `expired`), so the cap is not
held for ever by label sets that are gone (a spray of ports, a process that exited): new ones
get in again.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tfowatch.core.events import SPEC, Event, EventType
from tfowatch.core.metrics import Metric

OTHER = "other"
Labels = tuple[str, ...]


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    buckets: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = self.buckets or [0] * (len(self.bounds) + 1)

    def observe(self, value: float, n: int = 1) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.buckets), self.total, self.count)


@dataclass
class Snapshot:
    counters: dict[Metric, dict[Labels, int]]
    histograms: dict[Metric, dict[Labels, Histogram]]
    per_netns: dict[tuple[int, EventType], int]
    received: dict[EventType, int]
    dropped: dict[str, int]
    lost: int
    expired: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Snapshot:
        return cls({}, {}, {}, {}, {}, 0)

    def series(self, metric: Metric) -> Mapping[Labels, object]:
        return (self.histograms if metric.kind == "histogram" else self.counters).get(metric, {})


class Aggregator:
    def __init__(self, series_cap: int = 1000, netns_share: int = 100) -> None:
        if series_cap < 1 or not 1 <= netns_share <= 100:
            raise ValueError("series cap must be at least 1, a namespace's share 1 to 100 percent")
        self.series_cap = series_cap
        self.netns_limit = max(1, series_cap * netns_share // 100)  # label sets per namespace
        self._held: dict[Metric, Counter[str]] = defaultdict(Counter)  # label sets per netns label
        self._lock = threading.Lock()
        self._counters: dict[Metric, dict[Labels, int]] = defaultdict(dict)
        self._hist: dict[Metric, dict[Labels, Histogram]] = defaultdict(dict)
        self._per_netns: dict[tuple[int, EventType], int] = defaultdict(int)
        self._netns_seen: set[int] = set()
        self._received: dict[EventType, int] = defaultdict(int)
        self._dropped: dict[str, int] = defaultdict(int)
        self._lost = 0
        self._label_cache: dict[tuple[object, ...], list[tuple[Metric, Labels]]] = {}
        # expire(): each series' count when it last moved, and since when it has not
        self._marks: dict[Metric, dict[Labels, tuple[int, float]]] = defaultdict(dict)
        self._expired: dict[str, int] = defaultdict(int)

    def _cached_labels(self, ev: Event) -> list[tuple[Metric, Labels]]:
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
    def labels(ev: Event) -> list[tuple[Metric, Labels]]:
        """Each family `ev` feeds, with its label values in the family's label order."""
        spec = SPEC[ev.type]
        values = spec.label_values(ev)
        return [(metric, tuple(values[name] for name in metric.labels)) for metric in spec.metrics]

    def _bounded(self, metric: Metric, series: Mapping[Labels, object], key: Labels, n: int) -> Labels:
        """The label set to count `key` under; a new one is counted as held (the caller opens it)."""
        if key in series:
            return key
        held, other = self._held[metric], (OTHER,) * len(key)
        full = len(series) - (other in series) >= self.series_cap  # 'other' is not one of them
        if held[key[0]] >= self.netns_limit:  # netns is every probe family's first label
            self._dropped[metric.name] += n
            key = (key[0], *other[1:])
            if key in series:
                return key
        elif full:
            self._dropped[metric.name] += n
        if full:
            key = other
            if key in series:
                return key
        held[key[0]] += 1
        return key

    def add(self, ev: Event, n: int = 1) -> None:
        """Count `ev` n times (n > 1: an in-kernel count)."""
        with self._lock:
            self._received[ev.type] += n
            families = self._cached_labels(ev)
            for metric, key in families:
                if metric.kind == "histogram":
                    hists = self._hist[metric]
                    hkey = self._bounded(metric, hists, key, n)
                    hist = hists.get(hkey) or hists.setdefault(hkey, Histogram(metric.buckets))
                    hist.observe(SPEC[ev.type].observed(ev), n)
                else:
                    series = self._counters[metric]
                    key = self._bounded(metric, series, key, n)
                    series[key] = series.get(key, 0) + n
            if families and (ev.netns in self._netns_seen or len(self._netns_seen) < self.series_cap):
                self._netns_seen.add(ev.netns)
                self._per_netns[(ev.netns, ev.type)] += n

    def retire_netns(self, inodes: set[int]) -> None:
        """Every series and per-namespace count of these (gone) namespaces goes."""
        names = {str(ino) for ino in inodes}
        with self._lock:
            for metric, series in self._every_family():
                if "netns" in metric.labels:
                    at = metric.labels.index("netns")
                    for key in [k for k in series if k[at] in names]:
                        self._remove(metric, series, key)
            for gone in [k for k in self._per_netns if k[0] in inodes]:
                del self._per_netns[gone]
            self._netns_seen -= inodes
            self._label_cache.clear()

    def expire(self, now: float, ttl: float) -> None:
        """Remove every series whose count has not moved for `ttl` seconds (checked at each
        call: a scrape, not per event, so counting costs nothing more). A label set that
        comes back starts again from 0, which Prometheus reads as a counter reset."""
        with self._lock:
            for metric, series in self._every_family():
                marks = self._marks[metric]
                for key in list(series):
                    value = series[key]
                    count = value.count if isinstance(value, Histogram) else value
                    mark = marks.get(key)
                    if mark is None or mark[0] != count:
                        marks[key] = (count, now)
                    elif now - mark[1] >= ttl:
                        self._remove(metric, series, key)
                        self._expired[metric.name] += 1

    def _every_family(self) -> Iterator[tuple[Metric, dict[Labels, Any]]]:
        """Each family's series, counters and histograms alike (under self._lock)."""
        yield from self._counters.items()
        yield from self._hist.items()

    def _remove(self, metric: Metric, series: dict[Labels, Any], key: Labels) -> None:
        del series[key]
        self._marks[metric].pop(key, None)
        held = self._held[metric]
        held[key[0]] -= 1
        if held[key[0]] <= 0:
            del held[key[0]]

    def add_lost(self, count: int) -> None:
        with self._lock:
            self._lost += count

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                counters={m: dict(s) for m, s in self._counters.items()},
                histograms={m: {k: h.copy() for k, h in s.items()} for m, s in self._hist.items()},
                per_netns=dict(self._per_netns),
                received=dict(self._received),
                dropped=dict(self._dropped),
                lost=self._lost,
                expired=dict(self._expired),
            )
