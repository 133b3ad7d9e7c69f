"""The events of tfowatch/bpf/tfowatch.h: their Python view, and the one table of what each is.

The C header is the source of truth for codes and layout; tests/host/test_event_layout.py checks
that this mirror has the same enum values and the same struct layout as the compiled C.
EVENTS says, per event type, everything the rest derives: the design-card point that reports
it, its side, the metric families it feeds and with which label values, its `tfowatch top`
column, and the TcpExt counter it reconciles with.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tfowatch.core import metrics as m


class EventType(enum.IntEnum):
    COOKIE_REQUEST = 1
    COOKIE_ISSUED = 2
    SYN_DATA_ACCEPTED = 3
    INVALID_COOKIE = 4
    QUEUE_OVERFLOW = 5
    SERVER_DISABLED = 6
    SYN_DATA_SENT = 7
    SYN_DATA_ACKED = 8
    COOKIE_UNAVAILABLE = 9
    DATA_NOT_ACKED = 10
    SYN_RETRANSMITTED = 11
    TFO_DISABLED = 12
    BLACKHOLE_DISABLE = 13
    TW_REUSE_GRANTED = 14
    TW_REUSE_REFUSED = 15
    PLAIN_CONNECT = 16
    CONNECT_EADDRNOTAVAIL = 17
    TFO_TIMEOUT = 18


EV_TYPE_MAX = 19


class RefuseReason(enum.IntEnum):
    NO_TIMESTAMPS = 1
    REUSE_DISABLED = 2
    TOO_RECENT = 3
    NOT_LOOPBACK = 4


def refuse_reason(code: int) -> str:
    """The `reason` label of a refused TIME-WAIT reuse (the enum tw_refuse_reason code)."""
    try:
        return RefuseReason(code).name.lower()
    except ValueError:
        return "unknown"


@dataclass(frozen=True)
class Column:
    key: str  # JSON key and --sort name
    header: str


@dataclass(frozen=True)
class Reconciliation:
    """tfowatch_reconcile_drift{metric=label}: probe events of `events` minus `counter`'s delta.
    A tier that reports `required` reconciles, whether or not it sees the other events."""
    label: str
    counter: str
    events: tuple[EventType, ...]
    required: tuple[EventType, ...]


REFUSED = "refused"  # a `reason` taken from the event's refusal code (refuse_reason)


@dataclass(frozen=True)
class EventSpec:
    type: EventType
    point: str  # the design-card point that reports it ("" : a doctor-only build option)
    side: str  # server (softirq, no process) | client (the connecting process)
    metrics: tuple[m.Metric, ...] = ()  # the families it feeds (none: doctor's only)
    reason: str = ""  # the `reason` label value, or REFUSED
    result: str = ""  # the `result` label value
    column: Column | None = None  # its `tfowatch top` column
    reconcile: tuple[str, str] = ("", "")  # (drift label, TcpExt counter) it is checked against
    tfo_attempt: bool = False  # exactly one such event per client connection that tried TFO
    # A tier without it still reconciles its counter: then the drift is the increments it cannot
    # see (the tracepoint tier and the blackhole detection's TCPFastOpenActiveFail).
    unseen_shows_as_drift: bool = False
    outcome: bool = False  # what an answered SYN's data became (pending until then, at close)

    def label_values(self, ev: Event) -> dict[str, str]:
        """Every label an event of this type can give a family; each family takes its own."""
        return {"netns": str(ev.netns), "port": str(ev.port), "comm": ev.comm, "cgroup": ev.cgroup,
                "result": self.result,
                "reason": refuse_reason(ev.reason) if self.reason == REFUSED else self.reason}

    @staticmethod
    def observed(ev: Event) -> float:
        """What its histogram family observes (the only one: the TIME-WAIT socket's age)."""
        return ev.age_ms / 1000.0


E, COOKIE_GEN, CHECK, SEND, TW, BLACKHOLE = (EventType, "tcp_fastopen_cookie_gen", "tcp_fastopen_check",
                                             "tcp_send_syn_data", "tcp_twsk_unique",
                                             "tcp_fastopen_active_disable")
DETECT = "tcp_fastopen_active_detect_blackhole"
EVENTS = (
    EventSpec(E.COOKIE_REQUEST, COOKIE_GEN, "server", (m.COOKIE_REQUESTS,),
              column=Column("cookie_requests", "REQ"),
              reconcile=("cookie_requests", "TCPFastOpenCookieReqd")),
    EventSpec(E.COOKIE_ISSUED, COOKIE_GEN, "server", (m.COOKIES_ISSUED,),
              column=Column("cookies_issued", "ISSUED")),
    EventSpec(E.SYN_DATA_ACCEPTED, CHECK, "server", (m.SYN_DATA_ACCEPTED,),
              column=Column("syn_data_accepted", "ACCEPT"),
              reconcile=("syn_data_accepted", "TCPFastOpenPassive")),
    EventSpec(E.INVALID_COOKIE, COOKIE_GEN, "server", (m.PASSIVE_FALLBACKS,), "invalid_cookie",
              column=Column("invalid_cookie", "BADCOOKIE"),
              reconcile=("invalid_cookie", "TCPFastOpenPassiveFail")),
    EventSpec(E.QUEUE_OVERFLOW, COOKIE_GEN, "server", (m.PASSIVE_FALLBACKS,), "queue_overflow",
              column=Column("queue_overflow", "QFULL"),
              reconcile=("queue_overflow", "TCPFastOpenListenOverflow")),
    EventSpec(E.SERVER_DISABLED, COOKIE_GEN, "server", (m.PASSIVE_FALLBACKS,), "server_disabled",
              column=Column("server_disabled", "SRVOFF")),
    EventSpec(E.SYN_DATA_SENT, SEND, "client", (m.SYN_DATA_SENT,), column=Column("syn_data_sent", "SENT"),
              tfo_attempt=True),
    EventSpec(E.SYN_DATA_ACKED, SEND, "client", (m.SYN_DATA_ACKED,), column=Column("syn_data_acked", "ACKED"),
              reconcile=("syn_data_acked", "TCPFastOpenActive"), outcome=True),
    EventSpec(E.COOKIE_UNAVAILABLE, SEND, "client", (m.ACTIVE_FALLBACKS,), "cookie_unavailable",
              column=Column("cookie_unavailable", "NOCOOKIE"), tfo_attempt=True),
    EventSpec(E.DATA_NOT_ACKED, SEND, "client", (m.ACTIVE_FALLBACKS,), "data_not_acked",
              column=Column("data_not_acked", "NOTACKED"),
              reconcile=("active_fail", "TCPFastOpenActiveFail"), outcome=True),
    EventSpec(E.SYN_RETRANSMITTED, SEND, "client", (m.ACTIVE_FALLBACKS,), "syn_retransmitted",
              column=Column("syn_retransmitted", "SYNRTX"),
              reconcile=("active_fail", "TCPFastOpenActiveFail"), outcome=True),
    # The kernel's blackhole detection: a socket that sent a TFO option or SYN data (or a TFO
    # child) hit its third consecutive retransmission timeout; one connection may count again.
    EventSpec(E.TFO_TIMEOUT, DETECT, "client", (m.ACTIVE_FALLBACKS,), "tfo_timeout",
              column=Column("tfo_timeout", "TFOTIMEOUT"),
              reconcile=("active_fail", "TCPFastOpenActiveFail"), unseen_shows_as_drift=True),
    EventSpec(E.TFO_DISABLED, SEND, "client", (m.ACTIVE_FALLBACKS,), "tfo_disabled",
              column=Column("tfo_disabled", "TFOOFF"), tfo_attempt=True),
    EventSpec(E.BLACKHOLE_DISABLE, BLACKHOLE, "client", (m.BLACKHOLE_DISABLES,),
              column=Column("blackhole_disables", "BLACKHOLE"),
              reconcile=("blackhole_disables", "TCPFastOpenBlackhole")),
    EventSpec(E.TW_REUSE_GRANTED, TW, "client", (m.TW_REUSE, m.TW_REUSE_AGE), result="granted",
              column=Column("tw_granted", "TW_OK"), reconcile=("tw_reuse_granted", "TWRecycled")),
    EventSpec(E.TW_REUSE_REFUSED, TW, "client", (m.TW_REUSE, m.TW_REUSE_AGE), REFUSED, "refused",
              column=Column("tw_refused", "TW_REFUSED")),
    EventSpec(E.CONNECT_EADDRNOTAVAIL, "connect_eaddrnotavail", "client", (m.CONNECT_EADDRNOTAVAIL,),
              column=Column("eaddrnotavail", "NOPORT")),
    # A connect without TFO: only `doctor --watch` builds the programs that report it.
    EventSpec(E.PLAIN_CONNECT, "", "client"),
)
SPEC = {s.type: s for s in EVENTS}


def events_of(point: str) -> list[EventType]:
    return [s.type for s in EVENTS if s.point == point]


def _reconciliations() -> tuple[Reconciliation, ...]:
    labels: dict[str, list[EventSpec]] = {}
    for s in EVENTS:
        if s.reconcile[0]:
            labels.setdefault(s.reconcile[0], []).append(s)
    return tuple(Reconciliation(label, specs[0].reconcile[1], tuple(s.type for s in specs),
                                tuple(s.type for s in specs if not s.unseen_shows_as_drift))
                 for label, specs in labels.items())


RECONCILIATIONS = _reconciliations()
TFO_ATTEMPTS = tuple(s.type for s in EVENTS if s.tfo_attempt)
# The drift labels of those outcomes: where outcomes are counted at close, the connections
# still open (pending) are short in them, and the kernel has counted them already.
OUTCOME_LABELS = tuple(r.label for r in RECONCILIATIONS if all(SPEC[e].outcome for e in r.required))


def label_values(metric: m.Metric) -> dict[str, list[str]]:
    """The values the bounded labels (reason, result) of a probe family take."""
    out: dict[str, list[str]] = {}
    for s in EVENTS:
        if metric not in s.metrics:
            continue
        reasons = [refuse_reason(r) for r in RefuseReason] if s.reason == REFUSED else [s.reason]
        for label, values in (("result", [s.result]), ("reason", reasons)):
            if label in metric.labels:
                out.setdefault(label, []).extend(v for v in values if v and v not in out[label])
    return out


class RawEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("netns_cookie", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("age_ms", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("reason", ctypes.c_uint8),
        ("age_res", ctypes.c_uint8),
        ("comm", ctypes.c_char * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("family", ctypes.c_uint16),
    ]


class CountKey(ctypes.Structure):
    """struct count_key: the label set of an event counted in the kernel."""
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("netns_cookie", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("reason", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("comm", ctypes.c_char * 16),
    ]


class CountVal(ctypes.Structure):
    """struct count_val: how often, and the last process seen."""
    _fields_ = [
        ("count", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


EVENT_SIZE = ctypes.sizeof(RawEvent)
_CODES: dict[object, str] = {ctypes.c_uint64: "Q", ctypes.c_uint32: "I", ctypes.c_uint16: "H",
                             ctypes.c_uint8: "B"}


def struct_of(layout: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct for `layout`, with its padding: unpacking with it is several times
    faster than reading ctypes fields, and RawEvent stays the one mirror of the C struct."""
    fmt, at = "<", 0
    for name, ctype, *_bits in layout._fields_:
        field = getattr(layout, name)
        fmt += "x" * (field.offset - at)
        fmt += _CODES.get(ctype) or f"{ctypes.sizeof(ctype)}s"
        at = field.offset + field.size
    return struct.Struct(fmt + "x" * (ctypes.sizeof(layout) - at))


_RAW = struct_of(RawEvent)
_TYPES = {t.value: t for t in EventType}
_FAMILY_LEN: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}


@dataclass(frozen=True)
class Event:
    type: EventType
    netns: int
    port: int
    pid: int = 0
    comm: str = ""
    age_ms: int = 0
    reason: int = 0
    ts_ns: int = 0
    cgroup_id: int = 0
    cgroup: str = ""  # path under the cgroup v2 root, resolved in Python
    daddr: str = ""  # client events: the remote address
    netns_cookie: int = 0  # which namespace held the inode `netns` (0: the kernel does not say)


def _address(family: int, raw: bytes) -> str:
    size = _FAMILY_LEN.get(family)
    return socket.inet_ntop(family, raw[:size]) if size else ""


def _raw_address(addr: str) -> tuple[int, bytes]:
    if not addr:
        return 0, b""
    ip = ipaddress.ip_address(addr)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.packed


def _event_type(code: int) -> EventType:
    return _TYPES.get(code) or EventType(code)  # an unknown code raises ValueError


def _cgroup(cgroup_name: Callable[[int, int], str] | None, cgroup_id: int, pid: int) -> str:
    return cgroup_name(cgroup_id, pid) if cgroup_id and cgroup_name else ""


def decode(data: bytes | int, cgroup_name: Callable[[int, int], str] | None = None) -> Event:
    """Decode one perf-buffer sample (bytes, or a pointer as BCC passes it); `cgroup_name`
    (cgroup id, pid) -> path names the cgroup of client events."""
    if isinstance(data, int):
        data = ctypes.string_at(data, EVENT_SIZE)
    elif len(data) < EVENT_SIZE:
        raise ValueError(f"event of {len(data)} bytes, expected {EVENT_SIZE}")
    ts_ns, cgroup_id, cookie, netns, pid, etype, age_ms, port, reason, _res, comm, daddr, family = \
        _RAW.unpack_from(data)
    return Event(
        type=_event_type(etype), netns=netns, port=port, pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"), age_ms=age_ms, reason=reason,
        ts_ns=ts_ns, cgroup_id=cgroup_id,
        cgroup=_cgroup(cgroup_name, cgroup_id, pid),
        daddr=_address(family, daddr), netns_cookie=cookie,
    )


def counted(key: CountKey, pid: int, cgroup_name: Callable[[int, int], str] | None = None) -> Event:
    """The event an in-kernel count stands for (one of `count` identical ones)."""
    return Event(type=_event_type(key.type), netns=key.netns, port=key.port,
                 pid=pid, comm=key.comm.decode(errors="replace"), reason=key.reason,
                 cgroup_id=key.cgroup_id, netns_cookie=key.netns_cookie,
                 cgroup=_cgroup(cgroup_name, key.cgroup_id, pid))


def encode(ev: Event) -> bytes:
    """The bytes the kernel would send for `ev` (synthetic sources, tests, benches)."""
    family, packed = _raw_address(ev.daddr)
    raw = RawEvent(
        family=family, daddr=(ctypes.c_uint8 * 16)(*packed),
        ts_ns=ev.ts_ns, cgroup_id=ev.cgroup_id, netns_cookie=ev.netns_cookie, netns=ev.netns, pid=ev.pid,
        type=int(ev.type),
        age_ms=ev.age_ms, port=ev.port, reason=ev.reason, age_res=0, comm=ev.comm.encode()[:16],
    )
    return bytes(raw)
