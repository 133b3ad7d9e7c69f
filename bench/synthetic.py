"""Aggregator capacity with synthetic events.

decode_rate(): events/s that tfowatch's Ingest (decode → cgroup → aggregate) takes in-process,
  fed with events.encode() bytes: the Python side alone, no kernel.
perf_ladder(): the same Ingest behind a real perf buffer (bench/synthetic.bpf.c turns each
  getppid() of a generator process into BATCH events), polled as the daemon polls; the offered
  rate steps up until events are lost, so the result is the highest rate with zero loss and
  the first one with loss.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

from tfowatch.bpf.loader import BPF_DIR, WAKEUP_EVENTS, EventReader, import_bcc, libbcc_stderr
from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import Event, EventType, encode
from tfowatch.core.pipeline import POLL_MS, Ingest

SOURCE = Path(__file__).with_name("synthetic.bpf.c")  # includes the daemon's tfowatch.h
BATCH = 8  # events per getppid(), as in bench/synthetic.bpf.c
TYPES = (EventType.SYN_DATA_SENT, EventType.SYN_DATA_ACKED, EventType.SYN_DATA_ACCEPTED,
         EventType.COOKIE_ISSUED)


def decode_rate(n: int = 200_000) -> float:
    samples = [encode(Event(type=TYPES[i % len(TYPES)], netns=4026532000 + i % 4, port=7000 + i % 64,
                            pid=1000 + i % 8, comm="load", daddr="10.0.0.2"))
               for i in range(4096)]
    ingest = Ingest(Aggregator())
    t0 = time.perf_counter()
    for i in range(n):
        ingest(0, samples[i & 4095], 0)
    return n / (time.perf_counter() - t0)


def _generate(rate: float, seconds: float, go: Any) -> None:
    """getppid() for `rate` events per second, in 1 ms slices."""
    go.wait()
    per_slice = max(1, round(rate / BATCH / 1000))
    start = time.monotonic()
    slices = int(seconds * 1000)
    for k in range(slices):
        for _ in range(per_slice):
            os.getppid()
        delay = start + (k + 1) / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class PerfSource:
    """bench/synthetic.bpf.c loaded, its buffer feeding an Ingest, polled by one thread."""

    def __init__(self, pages: int, wakeup_events: int) -> None:
        bcc = import_bcc()
        with libbcc_stderr():
            self.bpf = bcc.BPF(src_file=str(SOURCE).encode(), cflags=[f"-I{BPF_DIR}"])
        self.agg = Aggregator()
        self.reader = EventReader(self.bpf, Ingest(self.agg), self.agg.add_lost, pages, wakeup_events)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.reader.poll(POLL_MS)

    def step(self, rate: float, seconds: float) -> dict[str, float]:
        """One rate: offered, received and lost events, and the rate actually reached."""
        before = self.agg.snapshot()
        sent0 = self.bpf[b"submitted"][ctypes.c_int(0)].value
        go = mp.Event()
        gen = mp.Process(target=_generate, args=(rate, seconds, go))
        gen.start()
        self.bpf[b"target"][ctypes.c_int(0)] = ctypes.c_uint32(gen.pid or 0)
        t0 = time.monotonic()
        go.set()
        gen.join()
        elapsed = time.monotonic() - t0
        self.bpf[b"target"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        offered = self.bpf[b"submitted"][ctypes.c_int(0)].value - sent0
        deadline = time.monotonic() + 5  # until every offered event is read or counted lost
        while True:
            self.reader.consume()
            after = self.agg.snapshot()
            accounted = sum(after.received.values()) - sum(before.received.values()) + \
                after.lost - before.lost
            if accounted >= offered or time.monotonic() > deadline:
                break
            time.sleep(POLL_MS / 1000)
        received = sum(after.received.values()) - sum(before.received.values())
        return {"target_rate": rate, "offered": offered, "received": received,
                "lost": after.lost - before.lost, "rate": offered / elapsed}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bpf.cleanup()


def perf_ladder(pages: int, seconds: float, rates: list[float],
                wakeup_events: int = WAKEUP_EVENTS) -> dict[str, Any]:
    """wakeup_events=1 is how tfowatch read its buffer before: one wakeup per event."""
    source = PerfSource(pages, wakeup_events)
    steps = []
    try:
        for rate in rates:
            step = source.step(rate, seconds)
            steps.append(step)
            if step["lost"] and len([s for s in steps if s["lost"]]) >= 2:
                break
    finally:
        source.close()
    clean = [s["rate"] for s in steps if not s["lost"] and s["received"] == s["offered"]]
    lossy = [s["rate"] for s in steps if s["lost"]]
    return {"perf_pages": pages, "wakeup_events": wakeup_events, "steps": steps,
            "max_zero_loss_rate": max(clean, default=0.0),
            "first_loss_rate": min(lossy, default=None)}
