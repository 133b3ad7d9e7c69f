"""What `doctor --watch` saw: every event of the window, tallied by who and where.

Client events are keyed by (netns, comm, remote address, remote port), server events by
(netns, listener port). Plain connects (connects without TFO) come only from the doctor's
build of the programs (PLAIN_CONNECTS); `run` does not pay for them.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tfowatch.core.events import SPEC, TFO_ATTEMPTS, Event, EventType, events_of

TW_EVENTS = frozenset(events_of("tcp_twsk_unique"))


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
    untimed: str = ""  # why the blackhole state has no times (CONFIG_HZ unknown), if it has none
    unwatched: list[str] = field(default_factory=list)  # sockops: listeners whose SYN-ACKs it cannot see
    client: dict[ClientKey, Counter[EventType]] = field(default_factory=lambda: defaultdict(Counter))
    pids: dict[ClientKey, set[int]] = field(default_factory=lambda: defaultdict(set))
    server: dict[tuple[int, int], Counter[EventType]] = field(default_factory=lambda: defaultdict(Counter))
    # (netns, remote address, remote port) -> refusal reason (or "granted") -> count
    time_wait: dict[tuple[int, str, int], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    blackholes: Counter[tuple[int, str, int]] = field(default_factory=Counter)
    lost: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ev: Event) -> None:
        """Pipeline sink: tally the event."""
        with self._lock:
            if ev.type in TW_EVENTS:
                labels = SPEC[ev.type].label_values(ev)  # granted, or why refused
                outcome = labels["reason"] or labels["result"]
                self.time_wait[(ev.netns, ev.daddr, ev.port)][outcome] += 1
            elif ev.type == EventType.BLACKHOLE_DISABLE:
                self.blackholes[(ev.netns, ev.daddr, ev.port)] += 1
            elif ev.pid:  # client side: a connecting process
                key = ClientKey(ev.netns, ev.comm, ev.daddr, ev.port)
                self.client[key][ev.type] += 1
                self.pids[key].add(ev.pid)
            else:
                self.server[(ev.netns, ev.port)][ev.type] += 1

    def tfo_attempts_to(self, netns: int, daddr: str, port: int) -> int:
        """Connections to daddr:port from this namespace that tried TFO, any process."""
        return sum(n[t] for k, n in self.client.items()
                   if (k.netns, k.daddr, k.port) == (netns, daddr, port) for t in TFO_ATTEMPTS)
