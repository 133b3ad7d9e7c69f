"""`tfowatch doctor` against real misconfigurations in namespaces this test creates: each
situation must be named with the kernel's own numbers as evidence, and a healthy namespace
must get no finding at all. The --watch test runs in the host's sockops tier and in the
VM lab's kprobe tier (tests/vm/lab.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from netlab import TFOWATCH, DoctorWatch, Host, Lab, doctor, findings, planned_plan, skip_unless_root_bpf

from tfowatch.cli import EXIT_FINDINGS

PORT = 7401
KEY = "a1b2c3d4-a1b2c3d4-a1b2c3d4-{:08x}"


def wait_for_time_wait(host: Host) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", host.name, "ss", "-Htn", "state", "time-wait"],
                             capture_output=True, text=True, check=True).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"no TIME-WAIT socket in {host.name}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    skip_unless_root_bpf("doctor")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.host_only
def test_server_with_client_only_sysctl(lab: Lab) -> None:
    srv, addr = lab.server("s", "1")  # client bit only: the listener asks for TFO in vain
    lab.start_server(srv, f"{PORT}:64")
    lab.client.peer("client", addr, str(PORT), "2")
    rc, report = doctor(srv)
    [f] = findings(report, "server_tfo_disabled", srv)
    assert rc == EXIT_FINDINGS and f["severity"] == "warning"
    assert f["evidence"]["TCPFastOpenCookieReqd"] == srv.tcpext()["TCPFastOpenCookieReqd"] == 2
    assert f["evidence"]["tfo_listeners"][0]["port"] == PORT
    assert f["evidence"]["tfo_listeners"][0]["tfo_qlen"] == 64  # what the server set
    assert f["fix"] == f"ip netns exec {srv.name} sysctl -w net.ipv4.tcp_fastopen=3 (adds the server bit 0x2)"


@pytest.mark.host_only
def test_server_tfo_turned_off_after_accepting(lab: Lab) -> None:
    """TFO worked, then the server bit went: doctor says what it accepted while it was on,
    not that no cookie is ever issued."""
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, f"{PORT}:64")
    seen = lab.client.peer("client", addr, str(PORT), "3")
    assert [s["acked"] for s in seen] == [False, True, True]
    srv.sysctl("net.ipv4.tcp_fastopen", "1")
    seen = lab.client.peer("client", addr, str(PORT), "2")
    assert not any(s["acked"] for s in seen)
    _, report = doctor(srv)
    [f] = findings(report, "server_tfo_disabled", srv)
    assert f["evidence"]["TCPFastOpenPassive"] == srv.tcpext()["TCPFastOpenPassive"] == 2
    assert "2 TFO connections were accepted since the namespace started, while the server bit was on" \
        in f["summary"], f["summary"]
    assert "ever" not in f["summary"], f["summary"]


@pytest.mark.host_only
def test_listener_without_tcp_fastopen(lab: Lab) -> None:
    srv, addr = lab.server("s", "3")  # server TFO on, but the application never asks for it
    lab.start_server(srv, f"{PORT}:0")
    seen = lab.client.peer("client", addr, str(PORT), "3")
    assert not any(s["acked"] for s in seen)
    rc, report = doctor(srv)
    [f] = findings(report, "listener_without_tfo", srv)
    assert rc == EXIT_FINDINGS
    assert f["evidence"]["port"] == PORT and f["evidence"]["tfo_qlen"] == 0
    assert f["evidence"]["TCPFastOpenCookieReqd"] == srv.tcpext()["TCPFastOpenCookieReqd"] == 3
    assert f["evidence"]["comms"]  # the process that holds the listener is named
    assert "TCP_FASTOPEN" in f["fix"]


@pytest.mark.host_only
def test_key_rotation(lab: Lab) -> None:
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, f"{PORT}:64")
    srv.sysctl("net.ipv4.tcp_fastopen_key", KEY.format(1))
    lab.client.peer("client", addr, str(PORT), "2")  # cookie, then SYN data accepted
    srv.sysctl("net.ipv4.tcp_fastopen_key", KEY.format(2))  # no backup: the cookie dies
    lab.client.peer("client", addr, str(PORT), "1")
    rc, report = doctor(srv)
    [f] = findings(report, "invalid_cookies", srv)
    kernel = srv.tcpext()
    assert rc == EXIT_FINDINGS
    assert f["evidence"]["TCPFastOpenPassiveFail"] == kernel["TCPFastOpenPassiveFail"] == 1
    assert f["evidence"]["TCPFastOpenPassive"] == kernel["TCPFastOpenPassive"]
    assert f["evidence"]["backup_key"] is False
    assert "NEW,OLD" in f["fix"]


@pytest.mark.host_only
@pytest.mark.parametrize("reuse", ["0", "2"])  # 2: loopback only, and this path is a veth
def test_tw_reuse_blocks_the_only_port(lab: Lab, reuse: str) -> None:
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, f"{PORT}:64")
    lab.client.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
    lab.client.sysctl("net.ipv4.tcp_tw_reuse", reuse)
    lab.client.peer("client", addr, str(PORT), "1", "--plain")  # we close first: TIME-WAIT here
    wait_for_time_wait(lab.client)
    rc, report = doctor(lab.client)
    [f] = findings(report, "time_wait_blocks_ports", lab.client)
    assert rc == EXIT_FINDINGS
    assert f["evidence"] | {"tcp_tw_reuse": int(reuse)} == {
        "destination": f"{addr}:{PORT}", "time_wait": 1, "ephemeral_ports": 1,
        "tcp_tw_reuse": int(reuse), "tcp_timestamps": 1}
    assert "tcp_tw_reuse=1" in f["fix"]


@pytest.mark.host_only
def test_healthy_namespaces_have_no_findings(lab: Lab) -> None:
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, f"{PORT}:64")
    seen = lab.client.peer("client", addr, str(PORT), "4")
    assert [s["acked"] for s in seen] == [False, True, True, True]  # TFO works here
    rc, report = doctor(srv, lab.client)
    assert rc == 0 and report["findings"] == [], report["findings"]
    assert {ns["netns"] for ns in report["namespaces"]} == {srv.inode, lab.client.inode}
    [s] = [ns for ns in report["namespaces"] if ns["netns"] == srv.inode]
    assert [(lst["port"], lst["tfo_qlen"]) for lst in s["listeners"]] == [(PORT, 64)]


def test_watch_names_the_plain_connecting_client_and_the_rotation(lab: Lab) -> None:
    """The resolver case: one process uses TFO, another (its TLS library) plain connect()s
    to the same server; and the key rotates during the window. Beside it, a client whose only
    local port is held by a TIME-WAIT socket it may not take over: its connects fail."""
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, f"{PORT}:64")
    srv.sysctl("net.ipv4.tcp_fastopen_key", KEY.format(1))
    lab.client.peer("client", addr, str(PORT), "1", "--comm", "tfo-app")  # cookie cached
    twc = lab.host("t")
    _, addr_tw = lab.link(twc, srv)
    twc.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
    twc.sysctl("net.ipv4.tcp_tw_reuse", "0")
    # A server whose TFO was turned off after the client got its cookie: its SYNs carry it.
    off, addr_off = lab.server("o", "3")
    lab.start_server(off, f"{PORT}:64")
    lab.client.peer("client", addr_off, str(PORT), "1", "--comm", "stale-app")
    off.sysctl("net.ipv4.tcp_fastopen", "1")
    # A long window, ended by SIGINT once the traffic is done: doctor then reports what it saw.
    with DoctorWatch(srv, lab.client, twc, off) as watch:
        lab.client.peer("client", addr, str(PORT), "3", "--comm", "tfo-app")
        lab.client.peer("client", addr, str(PORT), "2", "--comm", "tls-app", "--plain")
        lab.client.peer("client", addr, str(PORT), "1", "--comm", "unbound", "--plain")
        lab.client.peer("client", addr_off, str(PORT), "2", "--comm", "stale-app")
        srv.sysctl("net.ipv4.tcp_fastopen_key", KEY.format(2))
        lab.client.peer("client", addr, str(PORT), "1", "--comm", "tfo-app")
        # In the window (a TIME-WAIT socket lasts 60 s, less than doctor's start under emulation):
        twc.peer("client", addr_tw, str(PORT), "1", "--plain")  # we close first: TIME-WAIT here
        wait_for_time_wait(twc)
        failed = twc.peer("connect-fail", addr_tw, str(PORT), "3", "--comm", "tw-app")
        code, report, err = watch.report()
    assert code == EXIT_FINDINGS, err
    assert report["probe_tier"] == planned_plan()["tier"], f"watched below the plan: {report['notes']}"
    plains = {f["evidence"]["comm"]: f for f in findings(report, "plain_connect_to_tfo_server", lab.client)}
    assert set(plains) == {"tls-app", "unbound"}, plains
    plain = plains["tls-app"]
    assert "TCP_FASTOPEN_CONNECT" in plain["fix"]
    # a program whose behaviour is known gets what its operator can change, not the generic fix
    assert "never combines TFO with TLS" in plains["unbound"]["fix"], plains["unbound"]
    assert plain["severity"] == "warning"
    assert plain["evidence"]["comm"] == "tls-app"
    assert plain["evidence"]["destination"] == f"{addr}:{PORT}"
    assert plain["evidence"]["plain_connects"] == 2
    assert plain["evidence"]["tfo_attempts_by_others"] == 4
    assert plain["evidence"]["cookie_cached"] is True
    [rot] = findings(report, "invalid_cookies", srv)
    assert rot["evidence"]["TCPFastOpenPassiveFail"] == srv.tcpext()["TCPFastOpenPassiveFail"] == 1
    assert rot["evidence"]["key_changed_during_watch"] is True
    if report["probe_tier"] in ("kprobe", "sockops"):  # per-port: the SYN's TFO option at the listener
        assert rot["evidence"]["invalid_cookies_per_port"] == {str(PORT): 1}
    assert failed == [{"errno": "EADDRNOTAVAIL"}] * 3
    [noport] = findings(report, "connect_no_local_port", twc)
    assert noport["evidence"] | {"pids": []} == {
        "comm": "tw-app", "pids": [], "destination": f"{addr_tw}:{PORT}", "eaddrnotavail": 3,
        "time_wait": 1, "ephemeral_ports": 1, "tcp_tw_reuse": 0}
    # SYNs with the cookie issued before server TFO went off are not called cookie requests
    [stale] = findings(report, "server_tfo_disabled", off)
    assert stale["evidence"]["TCPFastOpenCookieReqd"] == 0, stale
    if report["probe_tier"] in ("kprobe", "sockops"):  # the SYN's option at the listener
        assert stale["evidence"]["syns_with_a_cookie"] == 2, stale
        assert "0 SYNs asked for a cookie in the last" in stale["summary"], stale
        assert "2 carried a cookie issued while it was on" in stale["summary"], stale
    # the namespaces' counters: since they started, and over the window
    [ns_off] = [ns for ns in report["namespaces"] if ns["netns"] == off.inode]
    assert ns_off["tcpext_since"] == "namespace_start"
    assert ns_off["tcpext"]["TCPFastOpenPassive"] == off.tcpext()["TCPFastOpenPassive"] == 0
    assert ns_off["tcpext_window"]["TCPFastOpenCookieReqd"] == 0
    assert ns_off["tcpext"]["TCPFastOpenCookieReqd"] == off.tcpext()["TCPFastOpenCookieReqd"] == 1
    codes = {f["code"] for f in report["findings"]}
    # the kprobe tier also sees each refusal of the TIME-WAIT socket (reuse_disabled)
    refusals = {"time_wait_reuse_refused"} if report["probe_tier"] == "kprobe" else set()
    assert codes == {"plain_connect_to_tfo_server", "invalid_cookies", "connect_no_local_port",
                     "time_wait_blocks_ports", "server_tfo_disabled"} | refusals, report["findings"]


@pytest.mark.host_only
def test_bad_input_is_one_line(lab: Lab) -> None:
    for args, needle in ((["--netns", "tfw-nosuch"], "no network namespace named"),
                         (["--watch", "0"], "must be a number of seconds above 0"),
                         (["-o", "yaml"], "invalid choice")):
        res = subprocess.run([str(TFOWATCH), "doctor", *args], capture_output=True, text=True)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
