"""Python view of the events defined in bpf/tfowatch.h.

The C header is the source of truth; tests/test_event_layout.py checks that this
mirror has the same enum values and the same struct layout as the compiled C.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
from dataclasses import dataclass


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


EV_TYPE_MAX = 17


class RefuseReason(enum.IntEnum):
    NO_TIMESTAMPS = 1
    REUSE_DISABLED = 2
    TOO_RECENT = 3
    NOT_LOOPBACK = 4


class RawEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
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


EVENT_SIZE = ctypes.sizeof(RawEvent)


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


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return ""


def _raw_address(addr: str) -> tuple[int, bytes]:
    if not addr:
        return 0, b""
    ip = ipaddress.ip_address(addr)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.packed


def decode(data: bytes | int) -> Event:
    """Decode one perf-buffer sample (bytes, or a pointer as BCC passes it)."""
    if isinstance(data, int):
        raw = ctypes.cast(data, ctypes.POINTER(RawEvent)).contents
    else:
        if len(data) < EVENT_SIZE:
            raise ValueError(f"event of {len(data)} bytes, expected {EVENT_SIZE}")
        raw = RawEvent.from_buffer_copy(data[:EVENT_SIZE])
    return Event(
        type=EventType(raw.type),
        netns=raw.netns,
        port=raw.port,
        pid=raw.pid,
        comm=raw.comm.decode(errors="replace"),
        age_ms=raw.age_ms,
        reason=raw.reason,
        ts_ns=raw.ts_ns,
        cgroup_id=raw.cgroup_id,
        daddr=_address(raw.family, bytes(raw.daddr)),
    )


def encode(ev: Event) -> bytes:
    """The bytes the kernel would send for `ev` (synthetic sources, tests, benches)."""
    family, packed = _raw_address(ev.daddr)
    raw = RawEvent(
        family=family, daddr=(ctypes.c_uint8 * 16)(*packed),
        ts_ns=ev.ts_ns, cgroup_id=ev.cgroup_id, netns=ev.netns, pid=ev.pid, type=int(ev.type),
        age_ms=ev.age_ms, port=ev.port, reason=ev.reason, age_res=0, comm=ev.comm.encode()[:16],
    )
    return bytes(raw)
