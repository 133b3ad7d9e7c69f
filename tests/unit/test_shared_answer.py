"""Concurrent scrapes share builds of the answer (tfowatch.exporter.shared), and no scrape gets
an answer built before it arrived: it would miss events submitted before its request."""

from __future__ import annotations

import gzip
import threading
import time

import pytest
from support import export_state, facts

from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import Event, EventType
from tfowatch.core.plan import resolve
from tfowatch.core.state import ExportState
from tfowatch.exporter.collector import Scrape
from tfowatch.exporter.shared import SharedBuild

BUILD_S = 0.2
CLIENTS = 20


class Builds:
    """A build that takes BUILD_S and answers with its own number; when each began."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.fail_next = False

    def __call__(self) -> bytes:
        self.started.append(time.monotonic())
        n = len(self.started)
        time.sleep(BUILD_S)
        if self.fail_next:
            self.fail_next = False
            raise OSError("a part failed")
        return str(n).encode()


def scrape_at_once(shared: SharedBuild, clients: int) -> list[tuple[float, int]]:
    """(when each client asked, the build that answered it), all clients at once."""
    out: list[tuple[float, int]] = []
    go = threading.Barrier(clients)

    def client() -> None:
        go.wait()
        asked = time.monotonic()
        out.append((asked, int(shared.get().text)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(out) == clients, "a client got no answer"
    return out


def test_twenty_scrapes_at_once_take_two_builds_and_none_gets_an_older_answer() -> None:
    builds = Builds()
    shared = SharedBuild(builds)
    first = shared.get()  # one scrape alone: its own build
    assert first.text == b"1" and len(builds.started) == 1
    answered = scrape_at_once(shared, CLIENTS)
    assert len(builds.started) <= 3, f"{len(builds.started)} builds for {CLIENTS} scrapes"
    for asked, build in answered:  # never a build that began before the scrape asked
        assert builds.started[build - 1] >= asked, (asked, build, builds.started)
    last = shared.get()  # one more, alone, after all that: a new build, not the last answer again
    assert last.text == str(len(builds.started)).encode()
    assert builds.started[-1] > max(asked for asked, _ in answered)


def test_the_daemons_scrape_shares_its_builds() -> None:
    """The same through /metrics' own Scrape: 20 renders at once read the state at most 3 times."""
    plan = resolve(facts("6.1."), "auto")
    agg = Aggregator()
    agg.add(Event(EventType.SYN_DATA_SENT, netns=8, port=443, comm="curl", cgroup="/"))
    reads: list[float] = []

    def slow_state() -> ExportState:
        reads.append(time.monotonic())
        time.sleep(BUILD_S)
        return export_state(plan, agg, {8: {"TCPFastOpenActive": 1}})

    scrape = Scrape(slow_state)
    bodies: list[bytes] = []
    go = threading.Barrier(CLIENTS)

    def client() -> None:
        go.wait()
        bodies.append(scrape.render(gzipped=len(bodies) % 2 == 0))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(bodies) == CLIENTS and len(reads) <= 3, (len(bodies), len(reads))
    texts = {gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b for b in bodies}
    assert all(b'tfowatch_syn_data_sent_total{' in t for t in texts)


def test_a_failed_build_fails_its_caller_and_the_next_scrape_builds_again() -> None:
    builds = Builds()
    shared = SharedBuild(builds)
    builds.fail_next = True
    with pytest.raises(OSError):
        shared.get()
    assert shared.get().text == b"2"


def test_gzip_is_of_the_same_answer_and_made_once() -> None:
    answer = SharedBuild(lambda: b"tfowatch_up 1\n" * 100).get()
    zipped = answer.gzipped()
    assert gzip.decompress(zipped) == answer.text and answer.gzipped() is zipped
