"""What one scrape, `top` interval or doctor view reads: a consistent snapshot of the daemon."""

from __future__ import annotations

from dataclasses import dataclass

from tfowatch.core.aggregator import Snapshot
from tfowatch.core.plan import Plan


@dataclass
class ExportState:
    plan: Plan
    snap: Snapshot
    totals: list[int] | None  # exact per-type counts from the kernel; None without BPF
    kernel: dict[int, dict[str, int]]
    unreadable: int  # namespaces found whose counters this process may not read
    drift: dict[tuple[int, str], int]
    attached: list[tuple[str, str, str, bool]]  # point, target, tier, attached
    version: str
    kernel_release: str
    series_cap: int
