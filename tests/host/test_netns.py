"""Namespace discovery, TcpExt reading and reconciliation against the real kernel."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from netlab import Lab

from tfowatch.core import netns
from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import Event, EventType
from tfowatch.core.reconcile import KernelCounters, drift


def test_parse_netstat_reads_the_tcpext_section() -> None:
    text = Path("/proc/net/netstat").read_text()
    ext = netns.parse_netstat(text)
    header = next(line for line in text.splitlines() if line.startswith("TcpExt:")).split()[1:]
    assert list(ext) == header and "TCPFastOpenPassive" in ext and "TWRecycled" in ext


@pytest.fixture
def bare_netns() -> str:  # type: ignore[misc]
    name = "tfw-unit-netns"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.usefixtures("root_bpf")
def test_namespace_without_process_is_found_and_read(bare_netns: str) -> None:
    path = f"/run/netns/{bare_netns}"
    ino = netns.inode(path)
    assert ino in netns.discover()
    # Same counters as `ip netns exec` reading /proc/net/netstat inside it.
    inside = subprocess.run(["ip", "netns", "exec", bare_netns, "cat", "/proc/net/netstat"],
                            check=True, capture_output=True, text=True).stdout
    assert netns.tcpext(path) == netns.parse_netstat(inside)
    subprocess.run(["ip", "netns", "exec", bare_netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"],
                   check=True)
    assert netns.sysctls(path, ("tcp_tw_reuse",)) == {"tcp_tw_reuse": "1"}
    assert netns.sysctls("/proc/self/ns/net", ("tcp_tw_reuse",))["tcp_tw_reuse"] != ""


@pytest.mark.usefixtures("root_bpf")
def test_namespaces_beyond_the_cap_are_counted_as_unread(bare_netns: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    found = len(netns.discover())
    assert found >= 2  # this one and ours
    kc = KernelCounters(max_namespaces=1)
    assert len(kc.read()[0]) == 1
    assert len(kc.unreadable) == found - 1  # not silently left out
    assert "beyond the cap of 1 are not read" in caplog.text
    caplog.clear()
    kc.read()
    assert "beyond the cap" not in caplog.text  # said once, not at every scrape


@pytest.mark.usefixtures("root_bpf")
def test_a_vanished_namespace_keeps_its_last_counters_for_the_grace_then_is_retired(bare_netns: str) -> None:
    """Gone: its last counters stay for `grace` (Prometheus sees its final values), but no
    drift (its last interval was never read on the kernel side); then it is retired."""
    kc = KernelCounters(grace=2.0)
    kc.start()
    ino = netns.inode(f"/run/netns/{bare_netns}")
    kernel, retired, _, _ = kc.read()
    assert ino in kernel and ino in kc.deltas(kernel) and not retired
    subprocess.run(["ip", "netns", "del", bare_netns], check=True)
    kernel, retired, _, _ = kc.read()
    assert ino in kernel and ino not in kc.deltas(kernel) and not retired
    time.sleep(2.1)
    kernel, retired, _, _ = kc.read()
    assert ino not in kernel and ino in retired and kc.retired == 1


def cookie_inside(name: str) -> int:
    """The namespace's cookie as a process inside it reads it (SO_NETNS_COOKIE)."""
    code = ("import socket; s = socket.socket(socket.AF_UNIX); "
            "print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))")
    return int(subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                              check=True, capture_output=True, text=True).stdout)


@pytest.mark.usefixtures("root_bpf")
def test_each_namespace_is_read_with_its_cookie_through_a_process_or_a_bind_mount(bare_netns: str) -> None:
    """Case 1: the cookie read for a namespace is the one its own processes see, whether it is
    found through a bind mount or through a process in it (asked once per process)."""
    ino = netns.inode(f"/run/netns/{bare_netns}")
    inside = subprocess.Popen(["ip", "netns", "exec", bare_netns, "sleep", "30"])
    try:
        time.sleep(0.3)
        cookies = netns.Cookies()
        assert cookies.supported
        by_mount = cookies.read(ino, f"/run/netns/{bare_netns}")[1]
        by_process = cookies.read(ino, f"/proc/{inside.pid}/ns/net")[1]
        assert by_mount == by_process == cookie_inside(bare_netns) > 0
        assert cookies.read(netns.self_netns(), "/proc/self/ns/net")[1] == netns.own_cookie()
    finally:
        inside.kill()
        inside.wait()


@pytest.mark.usefixtures("root_bpf")
def test_a_reused_inode_is_a_new_namespace_with_baseline_zero() -> None:
    """Case 1, kernel side: a server namespace with TFO counts at start is deleted, and a new
    one gets its inode before the next read. Before: the new one's counters were taken against
    the old one's baseline (a delta of -3). Now: the cookie read says it is another namespace,
    made after start, so its delta is its own counters."""
    lab = Lab()
    try:
        lab.settle()
        old, addr = lab.server("o", "3")
        lab.start_server(old, "7107")
        lab.client.peer("client", addr, "7107", "4")
        assert old.tcpext()["TCPFastOpenPassive"] == 3
        kc = KernelCounters()
        kc.start()
        _, _, before, _ = kc.read()
        lab.close_host(old)
        new = lab.host_with_inode(old.inode, "n", lambda role: lab.server(role, "3")[0])
        kernel, retired, after, reborn = kc.read()
        assert after[new.inode] == cookie_inside(new.name) != before[old.inode]
        assert kc.deltas(kernel)[new.inode]["TCPFastOpenPassive"] == 0 == new.tcpext()["TCPFastOpenPassive"]
        assert not retired and not reborn  # replaced (told by the cookie), not gone for the grace
    finally:
        lab.close()


@pytest.mark.usefixtures("root_bpf")
def test_without_cookies_a_counter_that_went_down_says_the_namespace_is_new() -> None:
    """Case 1 where the daemon may not enter namespaces (no CAP_SYS_ADMIN, so no cookie): the
    new namespace's counters are below the gone one's last reading, which cannot happen in one
    namespace, so it is taken as new (baseline 0) and reported for its series to be retired."""
    lab = Lab()
    try:
        lab.settle()
        old, addr = lab.server("o", "3")
        lab.start_server(old, "7108")
        kc = KernelCounters()
        kc.cookies.supported = False
        kc.start()
        lab.client.peer("client", addr, "7108", "4")
        _, _, _, reborn = kc.read()
        assert not reborn
        lab.close_host(old)
        new = lab.host_with_inode(old.inode, "n", lambda role: lab.server(role, "3")[0])
        kernel, _, cookies, reborn = kc.read()
        assert cookies[new.inode] == 0 and reborn == {new.inode}
        assert kc.deltas(kernel)[new.inode]["TCPFastOpenPassive"] == 0
    finally:
        lab.close()


def test_drift_is_probe_count_minus_kernel_delta() -> None:
    agg = Aggregator()
    for _ in range(3):
        agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=5, port=80))
    agg.add(Event(EventType.DATA_NOT_ACKED, netns=6, port=80, comm="c"))
    agg.add(Event(EventType.SYN_RETRANSMITTED, netns=6, port=80, comm="c"))
    deltas = {5: {"TCPFastOpenPassive": 2}, 6: {"TCPFastOpenActiveFail": 2}, 7: {}}
    out = drift(agg.snapshot(), deltas, ["syn_data_accepted", "active_fail"])
    # Every reconciled metric of a namespace where anything moved (0 when exact); none of an idle one.
    assert out == {(5, "syn_data_accepted"): 1, (5, "active_fail"): 0,
                   (6, "syn_data_accepted"): 0, (6, "active_fail"): 0}


def test_no_drift_for_a_namespace_whose_counters_were_never_read() -> None:
    """Events from a namespace tfowatch could not read (no CAP_SYS_ADMIN for a process-less
    one) have no kernel side: reporting them as drift would be a false alarm."""
    agg = Aggregator()
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=9, port=80))
    assert drift(agg.snapshot(), {5: {"TCPFastOpenPassive": 0}}, ["syn_data_accepted"]) == {}

