"""Aggregation and the cardinality cap."""

from __future__ import annotations

import random

from tfowatch.core.aggregator import OTHER, Aggregator
from tfowatch.core.events import Event, EventType, RefuseReason, decode, encode
from tfowatch.core.metrics import (
    ACTIVE_FALLBACKS,
    PASSIVE_FALLBACKS,
    SYN_DATA_ACCEPTED,
    SYN_DATA_SENT,
    TW_REUSE,
    TW_REUSE_AGE,
)


def test_server_and_client_labels() -> None:
    agg = Aggregator()
    for _ in range(3):
        agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=11, port=7001))
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=11, port=7002))
    agg.add(Event(EventType.INVALID_COOKIE, netns=11, port=7001))
    agg.add(Event(EventType.SYN_DATA_SENT, netns=22, port=7001, pid=5, comm="dig", cgroup="/pod1"))
    agg.add(Event(EventType.TFO_DISABLED, netns=22, port=53, pid=5, comm="dig"))
    s = agg.snapshot()
    assert s.counters[SYN_DATA_ACCEPTED] == {("11", "7001"): 3, ("11", "7002"): 1}
    assert s.counters[PASSIVE_FALLBACKS] == {("11", "7001", "invalid_cookie"): 1}
    assert s.counters[SYN_DATA_SENT] == {("22", "7001", "dig", "/pod1"): 1}
    assert s.counters[ACTIVE_FALLBACKS] == {("22", "53", "dig", "", "tfo_disabled"): 1}
    assert s.per_netns[(11, EventType.SYN_DATA_ACCEPTED)] == 4


def test_tw_reuse_result_reason_and_age_histogram() -> None:
    agg = Aggregator()
    agg.add(Event(EventType.TW_REUSE_REFUSED, 1, 80, comm="c", reason=RefuseReason.TOO_RECENT, age_ms=300))
    agg.add(Event(EventType.TW_REUSE_GRANTED, 1, 80, comm="c", age_ms=1500))
    agg.add(Event(EventType.TW_REUSE_REFUSED, 1, 80, comm="c", reason=99, age_ms=5))
    s = agg.snapshot()
    assert s.counters[TW_REUSE] == {("1", "80", "c", "", "refused", "too_recent"): 1,
                                    ("1", "80", "c", "", "granted", ""): 1,
                                    ("1", "80", "c", "", "refused", "unknown"): 1}
    granted = s.histograms[TW_REUSE_AGE][("1", "granted")]
    assert granted.count == 1 and granted.total == 1.5
    # 1.5 s lands in the (1, 2] bucket: buckets are 0.01 0.1 0.25 0.5 1 2 ...
    assert granted.buckets.index(1) == 5
    refused = s.histograms[TW_REUSE_AGE][("1", "refused")]
    assert refused.count == 2 and refused.buckets[0] == 1 and refused.buckets[3] == 1


def test_cap_folds_new_series_into_other_and_counts_them() -> None:
    agg = Aggregator(series_cap=10)
    rng = random.Random(7)
    total = 5000
    for _ in range(total):  # hostile: random remote ports and comms
        agg.add(Event(EventType.SYN_DATA_SENT, netns=1, port=rng.randrange(65536),
                      comm=f"p{rng.randrange(10**6)}"))
    s = agg.snapshot()
    series = s.counters[SYN_DATA_SENT]
    assert len(series) == 10 + 1
    assert series[(OTHER,) * 4] == s.dropped[SYN_DATA_SENT.name]
    assert sum(series.values()) == total  # nothing lost, only folded


def test_existing_series_keep_counting_after_the_cap() -> None:
    agg = Aggregator(series_cap=1)
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, 1, 80))
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, 1, 81))
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, 1, 80))
    assert agg.snapshot().counters[SYN_DATA_ACCEPTED] == {("1", "80"): 2, (OTHER, OTHER): 1}


def test_lost_events_are_counted() -> None:
    agg = Aggregator()
    agg.add_lost(3)
    agg.add_lost(4)
    assert agg.snapshot().lost == 7


def test_decode_round_trip() -> None:
    ev = Event(EventType.TW_REUSE_REFUSED, netns=4026531840, port=443, pid=1234,
               comm="curl", age_ms=999, reason=3, ts_ns=123456789, cgroup_id=77)
    assert decode(encode(ev)) == ev


def test_cgroup_names_resolve_ids_to_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tfowatch.core.cgroups import CgroupNames

    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    names = CgroupNames(root=tmp_path)
    ino = (tmp_path / "kubepods" / "pod1").stat().st_ino
    assert names.name(ino) == "/kubepods/pod1"
    assert names.name(tmp_path.stat().st_ino) == "/"
    assert names.name(0) == ""


def test_cgroup_of_a_vanished_cgroup_is_read_once_through_the_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from tfowatch.core.cgroups import CgroupNames, proc_cgroup

    names = CgroupNames(root=tmp_path)
    gone = 987654321  # an id the walk cannot find
    assert names.name(gone, pid=os.getpid()) == proc_cgroup(os.getpid())
    names.root = None  # a second lookup must come from the cache, not another walk or /proc read
    assert names.name(gone, pid=0) == proc_cgroup(os.getpid())


def test_a_retired_namespace_loses_every_series_and_starts_again_from_zero() -> None:
    agg = Aggregator()
    for ino in (5, 6):
        agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=ino, port=80), 3)
        agg.add(Event(EventType.TW_REUSE_GRANTED, netns=ino, port=80, age_ms=1500))
    agg.retire_netns({5})
    snap = agg.snapshot()
    for metric in (SYN_DATA_ACCEPTED, TW_REUSE, TW_REUSE_AGE):
        netns_at = metric.labels.index("netns")
        assert {key[netns_at] for key in snap.series(metric)} == {"6"}, metric.name
    assert {ino for ino, _ in snap.per_netns} == {6}
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=80))
    assert agg.snapshot().per_netns[(5, EventType.SYN_DATA_ACCEPTED)] == 1


def test_idle_series_expire_and_free_their_place_under_the_cap() -> None:
    agg = Aggregator(series_cap=2)
    for port in (80, 81):
        agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=port))
    agg.expire(100.0, ttl=10)  # first look: both marked
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=81))  # 81 moves, 80 does not
    agg.expire(105.0, ttl=10)
    agg.expire(111.0, ttl=10)
    snap = agg.snapshot()
    assert snap.counters[SYN_DATA_ACCEPTED] == {("5", "81"): 2}
    assert snap.expired == {SYN_DATA_ACCEPTED.name: 1}
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=82))  # its own series, not 'other'
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=80))  # back, but the cap is full again
    snap = agg.snapshot()
    assert snap.counters[SYN_DATA_ACCEPTED] == {("5", "81"): 2, ("5", "82"): 1, (OTHER, OTHER): 1}


def test_a_noisy_namespace_folds_into_its_own_other_and_leaves_room_for_the_rest() -> None:
    """Issue 16, case 4: a spray of ports and process names in one namespace used to fill the
    cap, and every new series of every other namespace went to 'other' until a restart. Now the
    namespace holds at most its share (50% of 100 here), its overflow stays attributed to it,
    and a listener in another namespace opened after the spray still gets its own series."""
    agg = Aggregator(series_cap=100, netns_share=50)
    rng = random.Random(3)
    for _ in range(5000):
        agg.add(Event(EventType.SYN_DATA_SENT, netns=1, port=rng.randrange(65536),
                      comm=f"p{rng.randrange(10**6)}"))
    for _ in range(1000):
        agg.add(Event(EventType.SYN_DATA_SENT, netns=2, port=853, comm="unbound"))
    s = agg.snapshot()
    series = s.counters[SYN_DATA_SENT]
    noisy = {k: v for k, v in series.items() if k[0] == "1"}
    assert len(noisy) == 50 + 1 and noisy[("1", OTHER, OTHER, OTHER)] == 5000 - 50
    assert series[("2", "853", "unbound", "")] == 1000  # attributed, not in 'other'
    assert s.dropped[SYN_DATA_SENT.name] == 5000 - 50
    assert sum(series.values()) == 6000  # nothing lost, only folded


def test_the_global_cap_still_bounds_many_namespaces_and_a_freed_series_makes_room() -> None:
    agg = Aggregator(series_cap=10, netns_share=50)
    for ns in range(1, 21):  # 20 namespaces, one listener each: the cap, not the share, bites
        agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=ns, port=80))
    series = agg.snapshot().counters[SYN_DATA_ACCEPTED]
    assert len(series) == 10 + 1 and series[(OTHER, OTHER)] == 10
    agg.retire_netns({1})
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=21, port=80))
    assert agg.snapshot().counters[SYN_DATA_ACCEPTED][("21", "80")] == 1
