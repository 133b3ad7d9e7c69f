"""The kernel's own TcpExt counters per namespace, and the drift of the probes against them.

drift = (events the probes reported in that namespace since start)
      - (kernel counter now - kernel counter at start)

A namespace first seen after start was created after start, so its baseline is 0.

A namespace that is gone (no process in it, no bind mount) keeps its last counters for
`grace` seconds, so Prometheus sees its final values for a few scrapes; then it is retired
(every series with its inode goes) and counted. Its drift is dropped at once: the traffic of
its last interval is in the probe counts but was never read on the kernel side, so any drift
would be false.

A namespace whose inode was given to a new one (another cookie at the same inode) is gone
too: its series are retired at once, and the new namespace starts from 0 (baseline 0, as one
created after start), which Prometheus sees as a counter reset of each `netns` series.
"""

from __future__ import annotations

import logging
import threading
import time

from tfowatch.core import netns
from tfowatch.core.aggregator import Snapshot
from tfowatch.core.events import OUTCOME_LABELS, RECONCILIATIONS
from tfowatch.core.metrics import KERNEL_COUNTERS

log = logging.getLogger(__name__)


class KernelCounters:
    def __init__(self, max_namespaces: int = 1000, grace: float = 300.0) -> None:
        self.max_namespaces = max_namespaces
        self.grace = grace
        self._lock = threading.Lock()
        self._baseline: dict[int, dict[str, int]] = {}
        self._last: dict[int, dict[str, int]] = {}
        self.live: set[int] = set()  # read at the last read()
        self._gone_since: dict[int, float] = {}
        self.retired = 0  # gone for the grace (a reused inode is Generations')
        self.cookies = netns.Cookies()
        self._cookie: dict[int, int] = {}  # inode -> the cookie its counters were last read from
        # found, but not read: not ours to read (kernel.namespace_blind_spots), or over the cap
        self.unreadable: set[int] = set()

    def _read_live(self) -> dict[int, tuple[dict[str, int], int]]:
        """inode -> (TFO/TIME-WAIT TcpExt counters, cookie) of every namespace read now."""
        out: dict[int, tuple[dict[str, int], int]] = {}
        found = sorted(netns.discover().items())
        over_cap = {ino for ino, _ in found[self.max_namespaces:]}  # not read: counted as unread
        if over_cap - self.unreadable:  # once per namespace newly over it
            log.warning("%d network namespaces beyond the cap of %d are not read (series_cap bounds "
                        "them): counted in tfowatch_netns_unreadable", len(over_cap), self.max_namespaces)
        unreadable: set[int] = set(over_cap)
        for ino, handle in found[: self.max_namespaces]:
            try:
                ext, cookie = self.cookies.read(ino, handle)
            except PermissionError as exc:
                if ino not in self.unreadable:
                    log.warning("netns %s (%s): cannot read its counters: %s", ino, handle, exc.strerror)
                unreadable.add(ino)
                continue
            except OSError as exc:  # namespace vanished between discovery and read
                log.debug("netns %s: %s", ino, exc)
                continue
            out[ino] = ({c: ext.get(c, 0) for c in KERNEL_COUNTERS}, cookie)
        self.cookies.done()
        self.unreadable = unreadable
        return out

    def read(self) -> tuple[dict[int, dict[str, int]], set[int], dict[int, int], set[int]]:
        """TFO/TIME-WAIT TcpExt counters of every namespace found, and of those gone less
        than `grace` ago (their last values), bounded; the namespaces retired now; the cookie
        of each namespace read (to tell a reused inode's new namespace from the old); and the
        inodes found to hold a new namespace by their counters alone (no cookie to say so)."""
        found = self._read_live()
        live = {ino: counters for ino, (counters, _) in found.items()}
        now = time.monotonic()
        reborn: set[int] = set()
        with self._lock:
            for ino, (counters, cookie) in found.items():
                if self._track(ino, cookie, counters):
                    reborn.add(ino)
            self.live = set(live)
            self._last.update(live)
            for ino in live:
                self._gone_since.pop(ino, None)
            for ino in self._last.keys() - live:
                self._gone_since.setdefault(ino, now)
            retired = {ino for ino, since in self._gone_since.items() if now - since >= self.grace}
            over = len(self._last) - len(retired) - self.max_namespaces
            retired |= set(sorted(self._gone_since, key=self._gone_since.__getitem__)[:max(0, over)])
            for ino in retired:
                self._forget(ino)
            self.retired += len(retired)
            return dict(self._last), retired, {ino: cookie for ino, (_, cookie) in found.items()}, reborn

    def _track(self, ino: int, cookie: int, counters: dict[str, int]) -> bool:
        """Another cookie at a known inode, or a counter below its last reading (a namespace's
        counters never go down): the namespace read before is gone, and this one was made after
        it, so after start: its baseline is 0. True when the counters alone said so (under _lock)."""
        last = self._last.get(ino, {})
        regressed = any(v < last.get(c, 0) for c, v in counters.items())
        if self._cookie.setdefault(ino, cookie) == cookie and not regressed:
            return False
        self._forget(ino)
        self._cookie[ino] = cookie
        return regressed and not cookie

    def forget(self, ino: int) -> None:
        """A new namespace holds this inode (its events said so): what was read is the old one's."""
        with self._lock:
            self._forget(ino)

    def _forget(self, ino: int) -> None:
        self._last.pop(ino, None)
        self._gone_since.pop(ino, None)
        self._baseline.pop(ino, None)
        self._cookie.pop(ino, None)

    def start(self) -> dict[int, int]:
        """Read every namespace once, as the baseline; the cookie of each."""
        found = self._read_live()
        with self._lock:
            self._baseline = {ino: counters for ino, (counters, _) in found.items()}
            self._last = dict(self._baseline)
            self._cookie = {ino: cookie for ino, (_, cookie) in found.items()}
            return dict(self._cookie)

    def deltas(self, now: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
        """Kernel counter deltas since start, of the namespaces read just now (the live ones)."""
        with self._lock:
            base, live = self._baseline, self.live
        return {ino: {c: v - base.get(ino, {}).get(c, 0) for c, v in counters.items()}
                for ino, counters in now.items() if ino in live}


def drift(snap: Snapshot, deltas: dict[int, dict[str, int]], labels: list[str],
          pending: dict[int, int] | None = None) -> dict[tuple[int, str], int]:
    """(netns, metric label) -> probe count minus kernel delta, for every reconciled label of
    each namespace whose counters were read (one never read has no kernel side to compare)
    and where anything reconciled moved: an idle namespace has nothing to reconcile.
    `pending`: per namespace, client connections answered whose outcome the probes count at
    close (tiers that resolve there), which the kernel has counted already."""
    recs = [rec for rec in RECONCILIATIONS if rec.label in labels]
    out: dict[tuple[int, str], int] = {}
    for ino, kernel in deltas.items():
        pairs = [(rec.label, sum(snap.per_netns.get((ino, ev), 0) for ev in rec.events),
                  kernel.get(rec.counter, 0)) for rec in recs]
        if any(probe or moved for _, probe, moved in pairs):
            out.update({(ino, label): probe - moved for label, probe, moved in pairs})
            _allow_pending(out, ino, (pending or {}).get(ino, 0))
    return out


def _allow_pending(out: dict[tuple[int, str], int], ino: int, pending: int) -> None:
    """The outcome labels short by exactly the pending connections, together, are exact: each
    open one is one of them, not yet counted. Any other shortfall stays as it is."""
    gaps = [out[(ino, label)] for label in OUTCOME_LABELS if (ino, label) in out]
    if pending and all(g <= 0 for g in gaps) and sum(gaps) == -pending:
        out.update({(ino, label): 0 for label in OUTCOME_LABELS if (ino, label) in out})
