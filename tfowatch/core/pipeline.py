"""The one event path shared by `tfowatch run` and `tfowatch top`: resolve the probe
plan, attach it, decode and aggregate events, and read the kernel's own counters."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tfowatch import __version__
from tfowatch.bpf.loader import release_compiler_heap
from tfowatch.core.aggregator import Aggregator, Snapshot
from tfowatch.core.blackhole import Blackhole
from tfowatch.core.btf import Btf, BtfError
from tfowatch.core.cgroups import CgroupNames
from tfowatch.core.events import CountKey, Event, counted, decode
from tfowatch.core.kernel import KernelFacts, detect, hz_unknown, perf_events_denied
from tfowatch.core.netns import Generations
from tfowatch.core.plan import PLAIN_BUILD, Plan, PlanError, Variant, fall_back, resolve
from tfowatch.core.reconcile import KernelCounters, drift
from tfowatch.core.state import KERNEL, PROBES, SELF, ExportState, Part, take

log = logging.getLogger(__name__)
POLL_MS = 50
# The probes part of a state: the aggregate, exact per-type totals, outcomes pending at close.
ProbeReading = tuple[Snapshot, list[int] | None, dict[int, int]]
# The kernel part: TcpExt per namespace, how many unreadable, active TFO's blackhole state.
KernelReading = tuple[dict[int, dict[str, int]], int, dict[int, Blackhole]]
EventFilter = Callable[[Event], bool]
EventSink = Callable[[Event], None]


def load_plan(facts: KernelFacts, mode: str, variant: Variant = PLAIN_BUILD,
              strict: bool = False) -> tuple[Plan, Any]:
    """Resolve and attach. In auto mode a failure falls one tier down, loudly (one ERROR that
    names the fix, and plan.degraded for the metrics); with `strict` it is an error instead."""
    plan = resolve(facts, mode)
    probes = None
    while plan.tier != "counters" and probes is None:
        plan, probes = _attach_or_fall_back(plan, facts, variant, strict)
    if plan.degraded is not None:
        log.error("%s", plan.degraded.describe(plan.tier))
    if probes is not None and (why := hz_unknown(facts)):
        log.warning("%s", why)
    return plan, probes



def _attach_or_fall_back(plan: Plan, facts: KernelFacts, variant: Variant, strict: bool
                         ) -> tuple[Plan, Any]:
    """(plan, its attached probes), or (the plan one tier down, None)."""
    from tfowatch.bpf.loader import DEGRADED_FIX, LoadError, Probes

    try:
        if plan.tier == "kprobe" and facts.kallsyms_error:  # no symbol is known to exist
            raise LoadError(f"kprobe targets unknown: {facts.kallsyms_error}", "kallsyms_unreadable")
        probes = Probes(plan, Btf.load(), variant)
        probes.attach()
        return plan, probes
    except (LoadError, BtfError) as exc:
        sockops_failed = isinstance(exc, LoadError) and exc.sockops  # needs no perf event
        if not sockops_failed and (denied := perf_events_denied()):  # every tier with probes
            raise PlanError(f"cannot attach probes: {denied}") from exc  # would fail the same way
        reason = exc.reason if isinstance(exc, LoadError) else "kernel_btf"
        if plan.mode != "auto":  # the tier asked for, or nothing
            raise PlanError(f"{exc}: {DEGRADED_FIX[reason]}") from exc
        if strict:
            raise PlanError(f"strict: {plan.tier} tier unavailable ({exc}): {DEGRADED_FIX[reason]}") from exc
        if plan.degraded is not None:  # the first failure is the one reported
            log.warning("%s tier unavailable too (%s)", plan.tier, exc)
        return fall_back(plan, facts, reason, str(exc), DEGRADED_FIX[reason], sockops_failed), None


class Ingest:
    """One perf-buffer sample → decode → cgroup name → (filter) → aggregator and sink. The
    poller calls it per event; benchmarks call it with synthetic events (bench/synthetic.py)."""

    def __init__(self, agg: Aggregator, keep: EventFilter | None = None,
                 sink: EventSink | None = None, generations: Generations | None = None) -> None:
        self.agg = agg
        self.keep = keep
        self.sink = sink
        self.cgroups = CgroupNames()
        self.generations = generations or Generations(lambda _ino, _cookie: None, enabled=False)

    def __call__(self, _cpu: int, data: Any, _size: int) -> None:
        ev = decode(data, self.cgroups.name)
        if self.keep is None or self.keep(ev):
            with self.generations.lock:
                if not self.generations.admit(ev.netns, ev.netns_cookie):
                    return
                self.agg.add(ev)
            if self.sink is not None:
                self.sink(ev)


class Pipeline:
    """Probes → decode → (filter) → aggregator, polled by one thread; `state()` is a
    consistent view that includes every event submitted before the call."""

    def __init__(self, mode: str = "auto", series_cap: int = 1000, perf_pages: int = 256,
                 keep: EventFilter | None = None, facts: KernelFacts | None = None,
                 variant: Variant = PLAIN_BUILD, strict: bool = False,
                 sink: EventSink | None = None, netns_grace: float = 300.0,
                 series_ttl: float = 0.0, netns_share: int = 100) -> None:
        """keep: events to aggregate (top's filters); sink: sees each kept event too (doctor's
        observation). variant.in_kernel_counts counts events per label set in a BPF map, read
        at each state(), instead of one perf sample per event (`run`; neither keep nor sink
        can see such events)."""
        if variant.in_kernel_counts and (keep or sink):
            raise ValueError("a filter or sink needs every event: no in-kernel counts with them")
        self.facts = facts or detect()
        self.variant = variant
        self.plan, self.probes = load_plan(self.facts, mode, variant, strict)
        self.agg = Aggregator(series_cap, netns_share)
        self._folded: dict[bytes, int] = {}  # in-kernel count already added, per key
        self._gained_at: dict[bytes, float] = {}  # when each key's count last moved
        self._released: set[bytes] = set()  # taken out of the map during this drain
        self._retired_now: set[int] = set()  # inodes replaced or retired during this state()
        self.series_ttl = series_ttl  # 0: series never expire
        self.counters = KernelCounters(max_namespaces=series_cap, grace=netns_grace)
        self.generations = Generations(self._replaced, enabled=self.counters.cookies.supported)
        if not self.counters.cookies.supported:
            log.warning("this kernel has no network namespace cookies (SO_NETNS_COOKIE, Linux 5.14): "
                        "a new namespace that gets a gone one's inode inherits its series")
        # one lock orders the in-kernel counts' folding and a namespace's replacement
        self._folding = self.generations.lock
        self.generations.seed(self.counters.start())
        if self.probes is not None:
            self.ingest = Ingest(self.agg, keep, sink, self.generations)
            self.ingest.cgroups.made = self.probes.cgroup_path
            self.probes.open_events(self.ingest, self.agg.add_lost, perf_pages)
        Btf.forget()
        release_compiler_heap()  # after forget(): the BTF's memory is handed back too

    def poll_once(self) -> None:
        if self.probes is not None:
            self.probes.poll(POLL_MS)
        else:
            time.sleep(POLL_MS / 1000)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll_once()

    def drain(self) -> None:
        """Read everything submitted before this call (in this thread, at once): the perf
        buffers, and what the in-kernel counts gained since the last call."""
        if self.probes is None:
            return
        self.probes.consume()
        now = time.monotonic()
        with self._folding:  # the read too: a release between it and the fold would be missed
            self._released.clear()
            folded = self._folded  # most keys have not moved since the last read: skip them here
            late = [raw for raw, count, pid in self.probes.counts() if folded.get(raw) != count
                    and raw not in self._released and not self._fold(raw, count, pid, now)]
            self._release(late, now)  # a replaced namespace's: they can only be late

    def _fold(self, raw: bytes, count: int, pid: int, now: float) -> bool:
        """Add what an in-kernel count gained since it was last folded (under _folding);
        False when the count is of a namespace already replaced."""
        gained = count - self._folded.get(raw, 0)
        if not gained:
            return True
        key = CountKey.from_buffer_copy(raw)
        self._folded[raw] = count
        self._gained_at[raw] = now
        if not self.generations.admit(key.netns, key.netns_cookie, gained):
            return False
        self.agg.add(counted(key, pid, self.ingest.cgroups.name), gained)
        return True

    def expire(self) -> None:
        """Series idle for series_ttl go, and the in-kernel counts idle as long leave the map
        (their last value folded in as they are deleted), so neither fills for good."""
        if not self.series_ttl:
            return
        now = time.monotonic()
        with self._folding:
            self._release([raw for raw, at in self._gained_at.items() if now - at >= self.series_ttl], now)
        self.agg.expire(now, self.series_ttl)

    def _release(self, raws: list[bytes], now: float) -> None:
        """Take these label sets out of the in-kernel counts, folding in what each gained
        last, and forget them: the next event of one opens it again from 0 (under _folding)."""
        if self.probes is not None and raws:
            for raw, count, pid in self.probes.take_counts(raws):
                self._fold(raw, count, pid, now)
        for raw in raws:
            self._folded.pop(raw, None)
            self._gained_at.pop(raw, None)
        self._released.update(raws)  # drain's list of counts may still hold them

    def attached(self) -> list[tuple[str, str, str, bool]]:
        probes = self.probes
        return self.plan.attachment_states(
            lambda a: probes is not None and probes.attached.get(a, False))

    def _probe_part(self) -> ProbeReading:
        self.drain()
        self.expire()
        if self.probes is None:
            return self.agg.snapshot(), None, {}
        return self.agg.snapshot(), self.probes.totals(), self.probes.pending_outcomes()

    def _kernel_part(self) -> KernelReading:
        kernel, retired, cookies, reborn = self.counters.read()
        with self._folding:
            for ino, cookie in cookies.items():
                self.generations.admit(ino, cookie)
            for ino in reborn:  # no cookie to read there: its counters went down
                self.generations.retire(ino)
        if retired:
            self.retire(retired)
        # After the namespaces' cookies were admitted: a gone one's state goes with it.
        states = self.probes.blackholes(self.generations.current) if self.probes is not None else {}
        return kernel, len(self.counters.unreadable), {ino: b for ino, b in states.items() if ino in kernel}

    def _replaced(self, ino: int, cookie: int) -> None:
        """A new namespace (`cookie`) holds inode `ino`: the one before it is gone. Its series
        and in-kernel counts go now; what they gained since last read is late (under _folding)."""
        log.info("netns %s: a new namespace took the inode of a gone one; the gone one's series "
                 "are retired", ino)
        self._retired_now.add(ino)
        older = []
        for raw in self._folded:
            key = CountKey.from_buffer_copy(raw)
            if key.netns == ino and key.netns_cookie != cookie:
                older.append(raw)
        self._release(older, time.monotonic())
        self.agg.retire_netns({ino})
        self.counters.forget(ino)  # its baseline was the gone one's (it may not read cookies)

    def retire(self, inodes: set[int]) -> None:
        """Namespaces gone for the grace period: their series, and their in-kernel counts."""
        log.info("retiring the series of %d network namespaces gone for %.0f s: %s", len(inodes),
                 self.counters.grace, ", ".join(map(str, sorted(inodes))))
        self._retired_now |= inodes
        with self._folding:
            self._release([raw for raw in self._folded if CountKey.from_buffer_copy(raw).netns in inodes],
                          time.monotonic())
            self.agg.retire_netns(inodes)  # after the release, which may fold in a last gain
            self.generations.forget(inodes)

    def state(self) -> ExportState:
        """Every part, each on its own (state.take): a failed one is empty and says so."""
        parts: dict[str, Part] = {}
        no_probes: ProbeReading = (Snapshot.empty(), None, {})
        no_kernel: KernelReading = ({}, 0, {})
        self._retired_now.clear()
        snap, totals, pending = take(parts, PROBES, self._probe_part, no_probes)
        kernel, unreadable, blackholes = take(parts, KERNEL, self._kernel_part, no_kernel)
        if self._retired_now and parts[PROBES].ok:  # the kernel part replaced or retired a namespace:
            snap = self.agg.snapshot()  # the snapshot must not hold the gone one's counts
        both = parts[PROBES].ok and parts[KERNEL].ok
        gap = drift(snap, self.counters.deltas(kernel), self.plan.reconciled, pending) if both else {}
        no_attachments: list[tuple[str, str, str, bool]] = []
        attached = take(parts, SELF, self.attached, no_attachments)
        return ExportState(
            plan=self.plan, snap=snap, totals=totals, kernel=kernel, unreadable=unreadable,
            retired={"gone": self.counters.retired, "inode_reused": self.generations.reused},
            late=self.generations.late,
            drift=gap, attached=attached, version=__version__, kernel_release=self.facts.release,
            series_cap=self.agg.series_cap, netns_limit=self.agg.netns_limit, parts=parts,
            unwatched=len(self.probes.unwatched) if self.probes is not None else 0, pending=pending,
            blackholes=blackholes, hz=(self.facts.hz, self.facts.hz_source),
        )

    def close(self) -> None:
        if self.probes is not None:
            self.probes.close()
