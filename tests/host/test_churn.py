"""A node with churn (issue 16): namespaces and cgroups that go between two scrapes, and
series that go idle. One daemon (`--netns-grace 3 --series-ttl 4`) on the host's tier, and in
the VM lab's kprobe tier too."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import (
    Host,
    Lab,
    Samples,
    free_port,
    scrape,
    series,
    sh,
    skip_unless_root_bpf,
    start_daemon,
    unit_caps,
    value,
)

from tfowatch.core.cgroups import cgroup2_mount
from tfowatch.core.events import CountKey

GRACE_S = 3
TTL_S = 4


@pytest.fixture(scope="module")
def daemon_proc() -> Iterator[tuple[str, int]]:
    """The /metrics URL and pid of a daemon with the unit's capabilities and short bounds."""
    skip_unless_root_bpf("churn tests")
    listen = f"127.0.0.1:{free_port()}"
    proc = start_daemon(listen, unit_caps("sys-admin.conf"), "--netns-grace", str(GRACE_S),
                        "--series-ttl", str(TTL_S))
    try:
        yield f"http://{listen}/metrics", proc.pid
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err


@pytest.fixture
def daemon(daemon_proc: tuple[str, int]) -> str:
    return daemon_proc[0]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Test hosts, deleted at the end. The next test's may get their inodes (case 1)."""
    hosts = Lab()
    try:
        yield hosts
    finally:
        hosts.close()


def counted_in_kernel(pid: int) -> list[CountKey]:
    """The keys of the `counts` map of the daemon `pid`, as bpftool dumps them."""
    held = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(FileNotFoundError):  # an fd the daemon closed meanwhile
            held |= {int(line.split()[1]) for line in info.read_text().splitlines()
                     if line.startswith("map_id:")}
    maps = json.loads(sh("bpftool", "-j", "map", "show").stdout)
    (map_id,) = [m["id"] for m in maps if m.get("name") == "counts" and m["id"] in held]
    entries = json.loads(sh("bpftool", "-j", "map", "dump", "id", str(map_id)).stdout)
    return [CountKey.from_buffer_copy(bytes(int(b, 16) for b in e["key"])) for e in entries]


def netns_series(samples: Samples, ino: int) -> list[str]:
    """Every series that names the namespace `ino`."""
    return sorted(f"{name}{dict(labels)}" for (name, labels), _ in samples.items()
                  if ("netns", str(ino)) in labels)


def test_a_gone_namespace_has_no_false_drift_and_its_series_are_retired_after_the_grace(
        daemon: str, lab: Lab) -> None:
    """Issue 16, case 2, through the daemon: a server namespace serves TFO, is scraped, serves
    more, and is deleted before the next scrape. Before: a drift of that last traffic (never
    read on the kernel side) and its series stayed for the life of the daemon. Now: its last
    values for the grace, no drift, then no series at all, counted."""
    url = daemon
    srv, addr = lab.server("g", "3")
    lab.start_server(srv, "7103")
    lab.client.peer("client", addr, "7103", "4", "--comm", "tfo-g")
    time.sleep(0.5)
    read = scrape(url)
    assert value(read, "tfowatch_reconcile_drift", netns=srv.inode, metric="syn_data_accepted") == 0
    assert value(read, "tfowatch_syn_data_accepted_total", netns=srv.inode, port=7103) == 3
    lab.client.peer("client", addr, "7103", "4", "--comm", "tfo-g")  # not read before it goes
    time.sleep(0.5)
    last = srv.tcpext()["TCPFastOpenPassive"]
    lab.close_host(srv)
    gone = scrape(url)
    assert value(gone, "tfowatch_syn_data_accepted_total", netns=srv.inode, port=7103) == last == 7
    assert value(gone, "tfowatch_kernel_tcpext_total", netns=srv.inode, counter="TCPFastOpenPassive") == 3
    assert not [s for s in netns_series(gone, srv.inode) if "reconcile_drift" in s]
    time.sleep(GRACE_S + 0.5)
    scrape(url)  # the one that retires it
    after = scrape(url)
    assert netns_series(after, srv.inode) == []
    assert value(after, "tfowatch_netns_retired_total", reason="gone") >= 1
    assert not {k: v for k, v in series(after, "tfowatch_reconcile_drift").items() if v}


def test_a_client_whose_cgroup_is_removed_before_the_scrape_keeps_its_cgroup_label(
        daemon: str, lab: Lab) -> None:
    """Issue 16, case 3: a job run in a cgroup of its own that is removed as soon as the job
    exits (a pod, a systemd-run unit), before any scrape. Before: cgroup="" (the in-kernel
    count's cgroup id was resolved when neither the cgroup nor the process existed). Now: its
    path, as cgroup:cgroup_mkdir recorded it."""
    if lab.cgroup is None:
        pytest.skip("no cgroup v2 mount")
    root = cgroup2_mount()
    assert root is not None
    srv, addr = lab.server("j", "3")
    lab.start_server(srv, "7104")
    job = lab.cgroup / "job-1"
    job.mkdir()
    lab.client.peer("client", addr, "7104", "3", "--comm", "tfo-job", cgroup=job)
    job.rmdir()
    sent = {dict(k)["cgroup"]: v for k, v in
            series(scrape(daemon), "tfowatch_syn_data_sent_total").items()
            if dict(k)["comm"] == "tfo-job"}
    assert sent == {"/" + str(job.relative_to(root)): 2}, sent  # the first of 3 asks for a cookie


def test_an_idle_series_expires_with_its_in_kernel_count_and_comes_back_from_zero(
        daemon_proc: tuple[str, int], lab: Lab) -> None:
    """Issue 16, case 4: a listener's series that has not moved for series_ttl is removed, and
    its in-kernel count with it (the map cannot fill for good), counted; traffic again later
    opens it from 0, and the namespace's drift stays exact throughout."""
    daemon, pid = daemon_proc
    srv, addr = lab.server("t", "3")
    lab.start_server(srv, "7105")
    labels = {"netns": srv.inode, "port": 7105}
    lab.client.peer("client", addr, "7105", "3", "--comm", "tfo-ttl")  # a cookie, then 2 with data
    time.sleep(0.5)
    first = scrape(daemon)
    assert value(first, "tfowatch_syn_data_accepted_total", **labels) == 2
    family = {"metric": "tfowatch_syn_data_accepted_total"}
    expired = value(first, "tfowatch_series_expired_total", **family)
    time.sleep(TTL_S + 0.5)
    idle = scrape(daemon)
    assert ("netns", str(srv.inode)) not in {p for k in series(idle, "tfowatch_syn_data_accepted_total")
                                             for p in k}, series(idle, "tfowatch_syn_data_accepted_total")
    assert value(idle, "tfowatch_series_expired_total", **family) >= expired + 1
    assert [k for k in counted_in_kernel(pid) if k.netns == srv.inode] == []  # the map let go
    lab.client.peer("client", addr, "7105", "2", "--comm", "tfo-ttl")  # the cookie is cached
    time.sleep(0.5)
    back = scrape(daemon)
    assert value(back, "tfowatch_syn_data_accepted_total", **labels) == 2  # from 0, not 4
    assert srv.tcpext()["TCPFastOpenPassive"] == 4
    assert value(back, "tfowatch_reconcile_drift", netns=srv.inode, metric="syn_data_accepted") == 0


def test_a_new_namespace_that_gets_a_gone_ones_inode_starts_from_zero(daemon: str, lab: Lab) -> None:
    """Issue 16, case 1: the kernel gives a deleted namespace's inode to the next new one at
    once. A server namespace serves TFO and is deleted; the next namespace made with its inode
    serves TFO too, before any scrape. Before: one `netns` series with both namespaces' counts
    and a drift of the gone one's (for the life of the daemon). Now: the gone one's series are
    retired (counted: inode_reused) and the new one's count from 0, exact against its TcpExt."""
    addrs: dict[str, str] = {}

    def server_like_old(role: str) -> Host:
        host, addr = lab.server(role, "3")
        addrs[host.name] = addr
        return host

    # Another process may take the freed inode first (CI boots the VM lab beside these
    # tests: CI once saw 100 candidates miss it); then the scenario starts again, at most 3 times.
    for attempt in range(3):
        lab.settle()
        old, addr = lab.server(f"o{attempt}", "3")
        lab.start_server(old, "7106")
        lab.client.peer("client", addr, "7106", "4", "--comm", "tfo-reuse")  # a cookie, then 3 with data
        time.sleep(0.5)
        first = scrape(daemon)
        assert value(first, "tfowatch_syn_data_accepted_total", netns=old.inode, port=7106) == 3
        reused = value(first, "tfowatch_netns_retired_total", reason="inode_reused")
        lab.close_host(old)
        try:
            new = lab.host_with_inode(old.inode, f"n{attempt}-", server_like_old)
            break
        except AssertionError as exc:
            print(f"attempt {attempt + 1}: {exc}")
    else:
        raise AssertionError("no attempt got a namespace on the inode just freed")
    new_addr = addrs[new.name]
    lab.start_server(new, "7106")
    lab.client.peer("client", new_addr, "7106", "3", "--comm", "tfo-reuse")  # a cookie, then 2
    time.sleep(0.5)
    after = scrape(daemon)
    kernel = new.tcpext()["TCPFastOpenPassive"]
    assert kernel == 2
    assert value(after, "tfowatch_syn_data_accepted_total", netns=new.inode, port=7106) == kernel  # not 5
    assert value(after, "tfowatch_kernel_tcpext_total", netns=new.inode,
                 counter="TCPFastOpenPassive") == kernel
    assert value(after, "tfowatch_reconcile_drift", netns=new.inode, metric="syn_data_accepted") == 0
    # and any earlier test's namespace whose inode went to a host made on the way
    assert value(after, "tfowatch_netns_retired_total", reason="inode_reused") >= reused + 1
    assert not {k: v for k, v in series(after, "tfowatch_reconcile_drift").items() if v}
