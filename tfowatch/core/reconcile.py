"""The kernel's own TcpExt counters per namespace, and the drift of the probes against them.

drift = (events the probes reported in that namespace since start)
      - (kernel counter now - kernel counter at start)

A namespace first seen after start was created after start, so its baseline is 0.
"""

from __future__ import annotations

import logging
import threading

from tfowatch.core import netns
from tfowatch.core.aggregator import Snapshot
from tfowatch.core.events import RECONCILIATIONS
from tfowatch.core.metrics import KERNEL_COUNTERS

log = logging.getLogger(__name__)


class KernelCounters:
    def __init__(self, max_namespaces: int = 1000) -> None:
        self.max_namespaces = max_namespaces
        self._lock = threading.Lock()
        self._baseline: dict[int, dict[str, int]] = {}
        self._last: dict[int, dict[str, int]] = {}
        # found, but not read: not ours to read (kernel.namespace_blind_spots), or over the cap
        self.unreadable: set[int] = set()

    def _read_live(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        found = sorted(netns.discover().items())
        over_cap = {ino for ino, _ in found[self.max_namespaces:]}  # not read: counted as unread
        if over_cap - self.unreadable:  # once per namespace newly over it
            log.warning("%d network namespaces beyond the cap of %d are not read (series_cap bounds "
                        "them): counted in tfowatch_netns_unreadable", len(over_cap), self.max_namespaces)
        unreadable: set[int] = set(over_cap)
        for ino, handle in found[: self.max_namespaces]:
            try:
                ext = netns.tcpext(handle)
            except PermissionError as exc:
                if ino not in self.unreadable:
                    log.warning("netns %s (%s): cannot read its counters: %s", ino, handle, exc.strerror)
                unreadable.add(ino)
                continue
            except OSError as exc:  # namespace vanished between discovery and read
                log.debug("netns %s: %s", ino, exc)
                continue
            out[ino] = {c: ext.get(c, 0) for c in KERNEL_COUNTERS}
        self.unreadable = unreadable
        return out

    def read(self) -> dict[int, dict[str, int]]:
        """TFO/TIME-WAIT TcpExt counters of every namespace found, bounded; a namespace
        that has vanished keeps its last values, so its drift stays meaningful."""
        live = self._read_live()
        with self._lock:
            self._last.update(live)
            while len(self._last) > self.max_namespaces:
                gone = next(ino for ino in self._last if ino not in live)
                del self._last[gone]
            return dict(self._last)

    def start(self) -> None:
        live = self._read_live()
        with self._lock:
            self._baseline = live
            self._last = dict(live)

    def deltas(self, now: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
        with self._lock:
            base = self._baseline
        return {ino: {c: v - base.get(ino, {}).get(c, 0) for c, v in counters.items()}
                for ino, counters in now.items()}


def drift(snap: Snapshot, deltas: dict[int, dict[str, int]], labels: list[str]
          ) -> dict[tuple[int, str], int]:
    """(netns, metric label) -> probe count minus kernel delta, for every reconciled label of
    each namespace whose counters were read (one never read has no kernel side to compare)
    and where anything reconciled moved: an idle namespace has nothing to reconcile."""
    recs = [rec for rec in RECONCILIATIONS if rec.label in labels]
    out: dict[tuple[int, str], int] = {}
    for ino, kernel in deltas.items():
        pairs = [(rec.label, sum(snap.per_netns.get((ino, ev), 0) for ev in rec.events),
                  kernel.get(rec.counter, 0)) for rec in recs]
        if any(probe or moved for _, probe, moved in pairs):
            out.update({(ino, label): probe - moved for label, probe, moved in pairs})
    return out
