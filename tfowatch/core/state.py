"""What one scrape, `top` interval or doctor view reads: a consistent snapshot of the daemon,
taken in parts (as node_exporter's collectors): a part that fails costs its own series only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tfowatch.core.aggregator import Snapshot
from tfowatch.core.blackhole import Blackhole
from tfowatch.core.plan import Plan

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBES, KERNEL, SELF = "probes", "kernel", "self"  # the parts, as the collector label says


@dataclass(frozen=True)
class Part:
    ok: bool
    seconds: float


@dataclass
class ExportState:
    plan: Plan
    snap: Snapshot  # empty when the probes part failed
    totals: list[int] | None  # exact per-type counts from the kernel; None without BPF
    kernel: dict[int, dict[str, int]]
    unreadable: int  # namespaces found whose counters this process may not read
    retired: dict[str, int]  # namespaces whose series went since start, by metrics.RETIRED_REASONS
    late: int  # events of a namespace already replaced (its inode reused), counted in no series
    drift: dict[tuple[int, str], int]
    attached: list[tuple[str, str, str, bool]]  # point, target, tier, attached
    version: str
    kernel_release: str
    series_cap: int
    netns_limit: int  # label sets one namespace may hold per metric
    parts: dict[str, Part] = field(default_factory=dict)
    unwatched: int = 0  # sockops: listeners open at start it could not ask for their SYN-ACKs
    pending: dict[int, int] = field(default_factory=dict)  # netns -> outcomes counted at close, open
    blackholes: dict[int, Blackhole] = field(default_factory=dict)  # netns -> active TFO's state
    hz: tuple[int, str] = (0, "")  # CONFIG_HZ that times the blackhole state, and its source

    def ok(self, part: str) -> bool:
        return self.parts.get(part, Part(True, 0.0)).ok


def take(parts: dict[str, Part], name: str, read: Callable[[], T], failed: T) -> T:
    """read(), timed and recorded in `parts`; `failed` (and a warning) if it raises."""
    started = time.perf_counter()
    try:
        value, ok = read(), True
    except Exception as exc:  # one part's failure must not cost the scrape
        log.warning("%s part of the state failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        value, ok = failed, False
    parts[name] = Part(ok, time.perf_counter() - started)
    return value
