"""`tfowatch top`: the shared pipeline, sampled every interval and shown as a table.

Interactive on a terminal (Rich full screen, keys below); plain tables or JSON lines
when stdout is not a terminal, with --once, or with -o table|json.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tfowatch.core import netns, nsconfig
from tfowatch.core.blackhole import Blackhole
from tfowatch.core.events import Event, EventType
from tfowatch.core.nsconfig import NamespaceConfig
from tfowatch.core.pipeline import Pipeline
from tfowatch.doctor import listeners as listeners_mod
from tfowatch.doctor.listeners import Listener
from tfowatch.top.rows import COLUMNS, KEY_FIELDS, Row, RowKey, build_rows, cell, path_verdict, with_deltas

MAX_NAMESPACES_SHOWN = 16


@dataclass
class Options:
    interval: float = 1.0
    count: int | None = None
    sort: str = "activity"
    reverse: bool = False
    rows: int | None = None
    pid: int | None = None
    port: int | None = None
    netns: int | None = None
    totals: bool = False
    text_filter: str = ""
    mode: str = "auto"
    series_cap: int = 1000  # label sets per metric before rows fold into 'other'


@dataclass
class Frame:
    time: float
    interval_s: float
    tier: str
    mode: str
    kernel: str
    lost: int
    available: set[EventType]
    rows: list[Row]
    namespaces: dict[int, NamespaceConfig] = field(default_factory=dict)
    tcpext_since_start: dict[int, dict[str, int]] = field(default_factory=dict)
    drift: dict[int, dict[str, int]] = field(default_factory=dict)
    # netns -> the kernel's active-TFO blackhole state, and when (CLOCK_MONOTONIC) it was read
    blackholes: dict[int, Blackhole] = field(default_factory=dict)
    now_ns: int = 0
    degraded: str = ""  # why the planned tier does not run, and the fix; "" when it does
    folded: int = 0  # events counted in 'other' rows: more label sets than opts.series_cap
    failed: list[str] = field(default_factory=list)  # state parts not read this interval
    unwatched: int = 0  # sockops: listeners open at start whose SYN-ACKs it cannot see


class TopSession:
    """Samples the pipeline; filters by pid/port/netns before aggregation."""

    def __init__(self, opts: Options, pipeline_factory: Callable[..., Pipeline] = Pipeline) -> None:
        self.opts = opts
        self._listeners: dict[tuple[int, int], Listener] = {}
        self._owned: set[tuple[int, int]] = set()
        self.refresh_listeners()
        self.pipeline = pipeline_factory(mode=opts.mode, keep=self._keep, series_cap=opts.series_cap)
        self._before: dict[RowKey, Row] = {}
        self._last_sample = time.monotonic()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self.pipeline.run, args=(self._stop,), daemon=True,
                                        name="tfowatch-poll")
        self._poller.start()

    def refresh_listeners(self, handles: dict[int, str] | None = None) -> None:
        self._listeners = listeners_mod.discover(handles=handles)
        pid = self.opts.pid
        self._owned = {k for k, lst in self._listeners.items() if pid in lst.pids}

    def _keep(self, ev: Event) -> bool:
        o = self.opts
        if o.netns is not None and ev.netns != o.netns:
            return False
        if o.port is not None and ev.port != o.port:
            return False
        if o.pid is not None:
            return ev.pid == o.pid if ev.pid else (ev.netns, ev.port) in self._owned
        return True

    def sample(self) -> Frame:
        handles = netns.discover()  # once per interval, for listeners and sysctls alike
        self.refresh_listeners(handles)
        st = self.pipeline.state()
        now = time.monotonic()
        rows = with_deltas(build_rows(st.snap, self._listeners), self._before)
        self._before = rows
        interval, self._last_sample = now - self._last_sample, now
        shown = sorted({int(k.netns) for k in rows if k.netns.isdigit()} |
                       ({self.opts.netns} if self.opts.netns is not None else set()))
        shown = shown[:MAX_NAMESPACES_SHOWN]
        deltas = self.pipeline.counters.deltas(st.kernel)
        drift: dict[int, dict[str, int]] = {}
        for (ino, label), v in st.drift.items():
            drift.setdefault(ino, {})[label] = v
        spaces = nsconfig.read(set(shown), handles)
        return Frame(
            time=time.time(), interval_s=interval, tier=st.plan.tier, mode=st.plan.mode,
            kernel=st.kernel_release, lost=st.snap.lost, available=set(st.plan.events),
            rows=list(rows.values()), namespaces=spaces,
            tcpext_since_start={i: deltas[i] for i in shown if i in deltas},
            drift={i: drift[i] for i in shown if i in drift},
            blackholes=st.blackholes, now_ns=time.monotonic_ns(),
            degraded=st.plan.degraded.describe(st.plan.tier) if st.plan.degraded else "",
            folded=sum(st.snap.dropped.values()),
            failed=[name for name, part in st.parts.items() if not part.ok],
            unwatched=st.unwatched,
        )

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        self.pipeline.close()


# --- ordering and filtering (shared by every output) ---

def _sort_value(row: Row, key: str, frame: Frame, totals: bool) -> tuple[int, int, str]:
    if key == "activity":  # what is shown, then all-time totals
        shown = row.totals if totals else row.deltas
        return sum(shown.values()), sum(row.totals.values()), ""
    if key in KEY_FIELDS:
        text = getattr(row.key, key)
        return (int(text), 0, "") if text.isdigit() else (-1, 0, text)
    col = next(c for c in COLUMNS if c.key == key)
    v = cell(row, col, frame.available, totals)
    return (v if isinstance(v, int) else -1), 0, ""


def ordered(frame: Frame, opts: Options) -> list[Row]:
    rows = [r for r in frame.rows if matches(r, frame, opts.text_filter)]
    rows.sort(key=lambda r: r.key)
    descending = opts.sort not in KEY_FIELDS
    rows.sort(key=lambda r: _sort_value(r, opts.sort, frame, opts.totals),
              reverse=descending != opts.reverse)
    return rows[: opts.rows] if opts.rows else rows


def matches(row: Row, frame: Frame, text: str) -> bool:
    if not text:
        return True
    ns = frame.namespaces.get(int(row.key.netns)) if row.key.netns.isdigit() else None
    fields = (row.key.netns, ns.name if ns else "", row.key.port, row.key.process)
    return any(text in f for f in fields)


# --- text for headers and cells ---

def fmt_cell(v: int | str | None) -> str:
    """n/a: the tier cannot count it; -: the column belongs to the other side."""
    return "n/a" if v is None else str(v) or "-"


def blackhole_text(ns: NamespaceConfig, frame: Frame) -> str:
    """Active TFO's blackhole state in the namespace, as the kernel keeps it."""
    b = frame.blackholes.get(ns.netns)
    if b is not None and b.disabled(frame.now_ns):
        return (f"ACTIVE TFO DISABLED (blackhole; disable {b.times}, TFO retried in "
                f"{b.reenable_in(frame.now_ns):.0f}s)")
    if b is not None and b.times and not b.timed:
        return (f"active TFO disabled {b.times}x since it last worked (CONFIG_HZ unknown: "
                "whether it still is, is not known)")
    if not ns.blackhole_timeout_s:
        return "blackhole detection off"
    after = f", {b.times} disables since TFO last worked" if b is not None and b.times else ""
    return f"blackhole timeout {ns.blackhole_timeout_s}s{after}"


def namespace_line(ns: NamespaceConfig, frame: Frame) -> str:
    tfo = ns.tcp_fastopen
    flags = "+".join(ns.tfo_flags) or "off"
    return (f"netns {ns.name}: tcp_fastopen={'?' if tfo is None else hex(tfo)} ({flags}) "
            f"tw_reuse={ns.tw_reuse} {blackhole_text(ns, frame)}")


MAX_PATH_LINES = 5


def path_lines(frame: Frame, opts: Options) -> list[str]:
    """One line per destination (remote port, process) whose counts point at the path."""
    suspect = [(r, *path_verdict(r)) for r in ordered(frame, opts)]
    suspect = [s for s in suspect if s[1]]
    lines = [f"PATH {verdict}: {r.key.process} -> :{r.key.port} (netns {r.key.netns}): {why}"
             for r, verdict, why in suspect[:MAX_PATH_LINES]]
    if len(suspect) > MAX_PATH_LINES:
        lines.append(f"PATH: {len(suspect) - MAX_PATH_LINES} more destinations (-o json lists all)")
    return lines


def header_lines(frame: Frame, opts: Options) -> list[str]:
    clock = time.strftime("%H:%M:%S", time.localtime(frame.time))
    what = "totals" if opts.totals else f"per {opts.interval:g}s"
    lines = [f"tfowatch top  kernel {frame.kernel}  tier {frame.tier} (mode {frame.mode})  "
             f"{what}  lost {frame.lost}  {clock}"]
    if frame.degraded:
        lines.append(f"DEGRADED: {frame.degraded}")
    if frame.failed:
        lines.append(f"INCOMPLETE: could not read {', '.join(frame.failed)} this interval "
                     "(the log says why): those counts are missing, not zero")
    if frame.folded:
        lines.append(f"FOLDED: {frame.folded} events are in 'other' rows: more label sets than "
                     f"--series-cap {opts.series_cap}")
    if frame.unwatched:
        lines.append(f"UNWATCHED: {frame.unwatched} listeners open before start: their cookie "
                     "requests, cookies and passive fallbacks are not seen (the log names them)")
    lines += [namespace_line(ns, frame) for ns in frame.namespaces.values()]
    return lines + path_lines(frame, opts)


# --- plain text and JSON ---

def plain_table(frame: Frame, opts: Options) -> str:
    heads = ["NETNS", "SIDE", "PORT", "PROCESS", *(c.header for c in COLUMNS)]
    body = [[r.key.netns, r.key.side, r.key.port, r.key.process,
             *(fmt_cell(cell(r, c, frame.available, opts.totals)) for c in COLUMNS)]
            for r in ordered(frame, opts)]
    widths = [max(len(x) for x in col) for col in zip(heads, *body, strict=True)]
    out = header_lines(frame, opts)
    for line in (heads, *body):
        out.append("  ".join(x.ljust(w) if i < 4 else x.rjust(w)
                             for i, (x, w) in enumerate(zip(line, widths, strict=True))).rstrip())
    return "\n".join(out)


def json_frame(frame: Frame, opts: Options) -> str:
    def as_int(text: str) -> int | str:
        return int(text) if text.isdigit() else text

    rows = []
    for r in ordered(frame, opts):
        d: dict[str, object] = {"netns": as_int(r.key.netns), "side": r.key.side,
                                "port": as_int(r.key.port), "process": r.key.process}
        for c in COLUMNS:
            if c.side == r.key.side:
                avail = c.event in frame.available
                d[c.key] = ({"delta": r.deltas.get(c.key, 0), "total": r.totals.get(c.key, 0)}
                            if avail else None)
        if r.cgroups:
            d["cgroups"] = sorted(r.cgroups)
        if r.tw_refused_reasons:
            d["tw_refused_reasons"] = dict(r.tw_refused_reasons)
        if r.key.side == "client":
            d["path"] = path_verdict(r)[0] or None
        rows.append(d)
    spaces = []
    for ino, ns in frame.namespaces.items():
        spaces.append(ns.as_dict() | {
            "tcpext_since_start": frame.tcpext_since_start.get(ino, {}),
            "drift": frame.drift.get(ino, {}),
            "active_tfo": active_tfo(frame, ino),
        })
    return json.dumps({"time": round(frame.time, 3), "interval_s": round(frame.interval_s, 3),
                       "kernel": frame.kernel, "mode": frame.mode, "tier": frame.tier,
                       "degraded": frame.degraded or None, "lost": frame.lost,
                       "series_cap": opts.series_cap, "folded": frame.folded,
                       "failed_parts": frame.failed, "unwatched_listeners": frame.unwatched,
                       "namespaces": spaces, "rows": rows})


def active_tfo(frame: Frame, ino: int) -> dict[str, object] | None:
    """The kernel's blackhole state for JSON; None where none was noted (never disabled)."""
    b = frame.blackholes.get(ino)
    if b is None:
        return None
    return {"disable_count": b.times, "disabled": b.disabled(frame.now_ns) if b.timed else None,
            "reenable_s": round(b.reenable_in(frame.now_ns), 1) if b.timed else None}


def frames(session: TopSession, opts: Options, stop: threading.Event) -> Iterator[Frame]:
    """One frame per interval until `count` frames or `stop`."""
    n = 0
    deadline = time.monotonic()
    while opts.count is None or n < opts.count:
        deadline += opts.interval
        if stop.wait(max(0.0, deadline - time.monotonic())):
            return
        yield session.sample()
        n += 1


def run_plain(session: TopSession, opts: Options, output: str, stop: threading.Event) -> None:
    for frame in frames(session, opts, stop):
        text = json_frame(frame, opts) if output == "json" else plain_table(frame, opts) + "\n"
        print(text, flush=True)
