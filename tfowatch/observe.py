"""What `doctor --watch` saw: every event of the window, tallied by who and where.

Client events are keyed by (netns, comm, remote address, remote port), server events by
(netns, listener port). Plain connects (connects without TFO) come only from the doctor's
build of the programs (PLAIN_CONNECTS); `run` does not pay for them.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tfowatch.events import Event, EventType, RefuseReason

CLIENT_TFO = (EventType.SYN_DATA_SENT, EventType.COOKIE_UNAVAILABLE, EventType.TFO_DISABLED)
TW_EVENTS = (EventType.TW_REUSE_GRANTED, EventType.TW_REUSE_REFUSED)


@dataclass(frozen=True)
class ClientKey:
    netns: int
    comm: str
    daddr: str
    port: int


@dataclass
class Observation:
    seconds: float = 0.0
    tier: str = ""
    degraded: str = ""  # why the planned tier could not be loaded, and its fix, if it could not
    client: dict[ClientKey, Counter[EventType]] = field(default_factory=lambda: defaultdict(Counter))
    pids: dict[ClientKey, set[int]] = field(default_factory=lambda: defaultdict(set))
    server: dict[tuple[int, int], Counter[EventType]] = field(default_factory=lambda: defaultdict(Counter))
    # (netns, remote address, remote port) -> refusal reason (or "granted") -> count
    time_wait: dict[tuple[int, str, int], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    blackholes: Counter[tuple[int, str, int]] = field(default_factory=Counter)
    lost: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ev: Event) -> bool:
        """Pipeline filter: tally the event; let the aggregator have all but plain connects."""
        with self._lock:
            if ev.type in TW_EVENTS:
                outcome = ("granted" if ev.type == EventType.TW_REUSE_GRANTED
                           else _reason(ev.reason))
                self.time_wait[(ev.netns, ev.daddr, ev.port)][outcome] += 1
            elif ev.type == EventType.BLACKHOLE_DISABLE:
                self.blackholes[(ev.netns, ev.daddr, ev.port)] += 1
            elif ev.pid:  # client side: a connecting process
                key = ClientKey(ev.netns, ev.comm, ev.daddr, ev.port)
                self.client[key][ev.type] += 1
                self.pids[key].add(ev.pid)
            else:
                self.server[(ev.netns, ev.port)][ev.type] += 1
        return ev.type != EventType.PLAIN_CONNECT

    def tfo_attempts_to(self, netns: int, daddr: str, port: int) -> int:
        """Connections to daddr:port from this namespace that tried TFO, any process."""
        return sum(n[t] for k, n in self.client.items()
                   if (k.netns, k.daddr, k.port) == (netns, daddr, port) for t in CLIENT_TFO)


def _reason(code: int) -> str:
    try:
        return RefuseReason(code).name.lower()
    except ValueError:
        return "unknown"
