"""`tfowatch top`'s model: the aggregator's series regrouped into one row per
(netns, side, port, process), with per-interval deltas and totals.

Server events carry no process (softirq context): a server row names the processes
that hold the listening socket. Client rows are per comm, summed over cgroups.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from tfowatch.core.aggregator import Snapshot
from tfowatch.core.events import EVENTS, REFUSED, SPEC
from tfowatch.core.events import EventType as E
from tfowatch.core.metrics import Metric
from tfowatch.doctor.findings import UNANSWERED_REQUESTS
from tfowatch.doctor.listeners import Listener


@dataclass(frozen=True)
class Column:
    key: str     # JSON key and --sort name
    header: str
    side: str    # the row side it applies to
    event: E     # the probe event it counts; n/a when the tier lacks it


COLUMNS = tuple(Column(s.column.key, s.column.header, s.side, s.type) for s in EVENTS if s.column)
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
KEY_FIELDS = ("netns", "side", "port", "process")
SORT_KEYS = ("activity", *KEY_FIELDS, *COLUMN_KEYS)


@dataclass(frozen=True, order=True)
class RowKey:
    netns: str
    side: str
    port: str
    process: str


@dataclass
class Row:
    key: RowKey
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deltas: dict[str, int] = field(default_factory=dict)
    cgroups: set[str] = field(default_factory=set)
    tw_refused_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _column_of(metric: Metric, labels: dict[str, str]) -> Column | None:
    """The column of the event type whose label values a series of `metric` carries."""
    for col in COLUMNS:
        spec = SPEC[col.event]
        if (metric in spec.metrics and labels.get("result", "") == spec.result
                and spec.reason in ("", REFUSED, labels.get("reason"))):
            return col
    return None


def _owner(listeners: dict[tuple[int, int], Listener], netns: str, port: str) -> str:
    if not (netns.isdigit() and port.isdigit()):
        return "?"
    lst = listeners.get((int(netns), int(port)))
    return ",".join(sorted(lst.comms)) if lst and lst.comms else "?"


def build_rows(snap: Snapshot, listeners: dict[tuple[int, int], Listener]) -> dict[RowKey, Row]:
    """Totals since start, one row per (netns, side, port, process)."""
    rows: dict[RowKey, Row] = {}
    for metric, series in snap.counters.items():
        for values, count in series.items():
            labels = dict(zip(metric.labels, values, strict=True))
            col = _column_of(metric, labels)
            if col is None:
                continue
            netns, port = labels["netns"], labels["port"]
            process = (_owner(listeners, netns, port) if col.side == "server"
                       else labels.get("comm") or "-")
            key = RowKey(netns, col.side, port, process)
            row = rows.setdefault(key, Row(key))
            row.totals[col.key] += count
            if labels.get("cgroup"):
                row.cgroups.add(labels["cgroup"])
            if col.key == "tw_refused":
                row.tw_refused_reasons[labels["reason"]] += count
    return rows


def with_deltas(now: dict[RowKey, Row], before: dict[RowKey, Row]) -> dict[RowKey, Row]:
    for key, row in now.items():
        prev = before.get(key)
        row.deltas = {k: v - (prev.totals.get(k, 0) if prev else 0) for k, v in row.totals.items()}
    return now


# What the path does to a client row's TFO, from its totals since start, worst first (as
# doctor's rules and the alerts judge a destination).
PATH_VERDICTS: tuple[tuple[str, Callable[[dict[str, int]], bool], str], ...] = (
    ("timeouts", lambda t: t["tfo_timeout"] > 0,
     "TFO connections timed out (SYN-ACKs or data eaten: blackhole)"),
    ("drops SYN data", lambda t: t["syn_data_sent"] >= 2 and 2 * t["syn_retransmitted"] > t["syn_data_sent"],
     "most SYNs with data were retransmitted without it"),
    ("no cookie", lambda t: t["cookie_unavailable"] >= UNANSWERED_REQUESTS and not t["syn_data_sent"],
     "cookie requests never answered: option stripped, or no server TFO"),
    ("TFO off", lambda t: t["tfo_disabled"] > 0, "connects went without TFO: the kernel had it disabled"),
)


def path_verdict(row: Row) -> tuple[str, str]:
    """(verdict, what it means) for a client row, ("", "") when nothing points at the path."""
    if row.key.side != "client":
        return "", ""
    t = defaultdict(int, row.totals)
    return next(((v, why) for v, test, why in PATH_VERDICTS if test(t)), ("", ""))


def cell(row: Row, col: Column, available: set[E], totals: bool) -> int | str | None:
    """A row's value in a column: a count, None when the tier cannot fill it, or ""
    when the column belongs to the other side."""
    if col.side != row.key.side:
        return ""
    if col.event not in available:
        return None
    return (row.totals if totals else row.deltas).get(col.key, 0)
