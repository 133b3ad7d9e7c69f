"""Python view of the events defined in tfowatch/bpf/tfowatch.h.

The C header is the source of truth; tests/test_event_layout.py checks that this
mirror has the same enum values and the same struct layout as the compiled C.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from collections.abc import Callable
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


class CountKey(ctypes.Structure):
    """struct count_key: the label set of an event counted in the kernel."""
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
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
    ts_ns, cgroup_id, netns, pid, etype, age_ms, port, reason, _res, comm, daddr, family = \
        _RAW.unpack_from(data)
    return Event(
        type=_event_type(etype), netns=netns, port=port, pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"), age_ms=age_ms, reason=reason,
        ts_ns=ts_ns, cgroup_id=cgroup_id,
        cgroup=_cgroup(cgroup_name, cgroup_id, pid),
        daddr=_address(family, daddr),
    )


def counted(key: CountKey, pid: int, cgroup_name: Callable[[int, int], str] | None = None) -> Event:
    """The event an in-kernel count stands for (one of `count` identical ones)."""
    return Event(type=_event_type(key.type), netns=key.netns, port=key.port,
                 pid=pid, comm=key.comm.decode(errors="replace"), reason=key.reason,
                 cgroup_id=key.cgroup_id,
                 cgroup=_cgroup(cgroup_name, key.cgroup_id, pid))


def encode(ev: Event) -> bytes:
    """The bytes the kernel would send for `ev` (synthetic sources, tests, benches)."""
    family, packed = _raw_address(ev.daddr)
    raw = RawEvent(
        family=family, daddr=(ctypes.c_uint8 * 16)(*packed),
        ts_ns=ev.ts_ns, cgroup_id=ev.cgroup_id, netns=ev.netns, pid=ev.pid, type=int(ev.type),
        age_ms=ev.age_ms, port=ev.port, reason=ev.reason, age_res=0, comm=ev.comm.encode()[:16],
    )
    return bytes(raw)
