"""End to end on the running kernel: real TFO traffic between namespaces this test creates,
a running `tfowatch run` scraped over HTTP, and every series compared with what the peers
observed (tcp_info) and with the namespaces' own TcpExt deltas.

On the host (6.18, no kprobes) this exercises the sockops tier auto picks and the tracepoint
tier; in the VM lab (kprobe kernels) the same scenarios check the kprobe tier's TIME-WAIT
decisions too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netlab import (
    IN_GUEST,
    Host,
    Lab,
    Samples,
    free_port,
    planned_plan,
    scrape,
    series,
    skip_unless_root_bpf,
    start_daemon,
    unit_caps,
    value,
)

from tfowatch.core.cgroups import proc_cgroup

PORT_A, PORT_B, PORT_D, PORT_TW, PORT_Q = 7001, 7002, 7003, 7004, 7005
Q_COMM, TW_COMM, HELD_COMM = "tfo-q", "tfo-tw", "tfo-held"
COUNTERS = ("TCPFastOpenActive", "TCPFastOpenActiveFail", "TCPFastOpenPassive",
            "TCPFastOpenPassiveFail", "TCPFastOpenCookieReqd", "TCPFastOpenListenOverflow",
            "TWRecycled")


Seen = dict[tuple[int, str, str], list[dict[str, Any]]]  # (port, comm, cgroup) -> tcp_info rows


@dataclass
class Run:
    samples: Samples
    mode: str
    tier: str
    client: Host
    server: Host
    disabled: Host
    tw_client: Host
    client_seen: Seen
    accepted: list[dict[str, Any]]  # server S accept log
    deltas: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> counter -> delta
    absolute: dict[str, dict[str, int]] = field(default_factory=dict)
    reused: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)  # syn-hold rows to PORT_Q
    ephemeral: dict[str, Any] = field(default_factory=dict)
    pending_expected: int = 0  # the held connection, where its outcome waits for its end
    stderr: str = ""
    exit_code: int | None = None


Rows = list[dict[str, Any]]


def drive(lab: Lab, srv: Host, addr_s: str, addr_d: str) -> tuple[Seen, Rows, Rows]:
    """The TFO scenarios, then TIME-WAIT reuse by bind()+connect()."""
    seen: Seen = {}

    own_cgroup = proc_cgroup(os.getpid())

    def client(addr: str, port: int, count: int, comm: str, in_lab_cgroup: bool = False) -> None:
        cg = lab.cgroup if in_lab_cgroup else None
        rows = lab.client.peer("client", addr, str(port), str(count), "--comm", comm, cgroup=cg)
        assert len(rows) == count
        cgroup = f"/{cg.name}" if cg is not None else own_cgroup
        seen.setdefault((port, comm, cgroup), []).extend(rows)

    client(addr_s, PORT_A, 1, "tfo-a")   # no cookie yet: cookie request
    client(addr_s, PORT_A, 3, "tfo-a")   # SYN data accepted
    client(addr_s, PORT_B, 5, "tfo-b", in_lab_cgroup=True)  # another listener, count, cgroup
    srv.sysctl("net.ipv4.tcp_fastopen_key", "a1b2c3d4-a1b2c3d4-a1b2c3d4-a1b2c3d4")
    client(addr_s, PORT_A, 2, "tfo-a")   # stale cookie: invalid, then accepted again
    client(addr_d, PORT_D, 2, "tfo-d")   # server without server TFO: never a cookie
    # TFO queue of 1 on PORT_Q: the first SYN's child stays in SYN_RECV because its
    # SYN-ACK is dropped here, so the second SYN overflows the queue.
    with lab.client.dropping_synacks(PORT_Q):
        held = lab.client.peer("syn-hold", addr_s, str(PORT_Q), "2", "--comm", Q_COMM)
    reused = lab.client.peer("tw-bind-reuse", addr_s, str(PORT_TW))
    return seen, held, reused


def client_at_syn_ack(mode: str) -> bool:
    """Whether the plan of `mode` decides a client's outcome at the SYN-ACK (sock_ops): then a
    connection left open through the scrape must be counted already."""
    plan = planned_plan(mode=mode)
    return any(p["point"] == "tcp_send_syn_data" and "sockops" in {a["kind"] for a in p["attachments"]}
               for p in plan["points"])


def hold_open(lab: Lab, addr: str) -> subprocess.Popen[str]:
    """One more TFO connection (it has the cookie), kept open until the caller closes it."""
    held = lab.client.popen("client", addr, str(PORT_B), "1", "--comm", HELD_COMM, "--hold",
                            stdin=subprocess.PIPE)
    assert held.stdout is not None
    row = json.loads(held.stdout.readline())
    assert row == {"acked": True, "client_fail": 0}, row
    return held


# The tier auto picks (sockops on the 6.18 host, kprobe in the VM lab), and on the host the
# tracepoint tier too, which auto falls back to when sock_ops cannot be loaded.
MODES = ["auto"] if IN_GUEST else ["auto", "tracepoint"]


@pytest.fixture(scope="module", params=MODES)
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    skip_unless_root_bpf("integration test")
    lab = Lab()
    proc = held = None
    try:
        srv, addr_s = lab.server("s", "3")
        dis, addr_d = lab.server("d", "1")
        # TIME-WAIT client with a single ephemeral port: reuse is refused until the
        # TIME-WAIT socket is old enough (tcp_tw_reuse=1: this is not loopback).
        twc = lab.host("t")
        _, addr_s_tw = lab.link(twc, srv)
        twc.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
        twc.sysctl("net.ipv4.tcp_tw_reuse", "1")
        listen = f"127.0.0.1:{free_port()}"
        # The unit's capabilities plus sys-admin.conf: the client namespace has no process.
        # Started before the servers: the sockops tier sees listeners opened after it.
        proc = start_daemon(listen, unit_caps("sys-admin.conf"), "--mode", request.param)
        log = lab.start_server(srv, str(PORT_A), str(PORT_B), str(PORT_TW), f"{PORT_Q}:1")
        lab.start_server(dis, str(PORT_D))
        hosts = {"client": lab.client, "server": srv, "disabled": dis, "tw": twc}
        before = {k: h.tcpext() for k, h in hosts.items()}
        seen, syn_held, reused = drive(lab, srv, addr_s, addr_d)
        # Open through the scrape: counted already where outcomes are decided at the SYN-ACK,
        # else pending (and allowed for by the drift) until it ends.
        held = hold_open(lab, addr_s)
        at_syn_ack = client_at_syn_ack(request.param)
        if at_syn_ack:
            seen[(PORT_B, HELD_COMM, proc_cgroup(os.getpid()))] = [{"acked": True, "client_fail": 0}]
        (ephemeral,) = twc.peer("tw-ephemeral", addr_s_tw, str(PORT_TW), "--comm", TW_COMM)
        time.sleep(0.5)  # let the last FIN/ACKs settle before reading the truth
        after = {k: h.tcpext() for k, h in hosts.items()}
        samples = scrape(f"http://{listen}/metrics")
        tier = next(dict(lab_)["tier"] for (n, lab_) in samples if n == "tfowatch_build_info")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        yield Run(samples=samples, mode=request.param, tier=tier, client=lab.client, server=srv,
                  disabled=dis, tw_client=twc,
                  client_seen=seen, accepted=lab.accepted(log),
                  deltas={k: {c: after[k][c] - before[k][c] for c in COUNTERS} for k in hosts},
                  absolute=after, reused=reused, held=syn_held, ephemeral=ephemeral,
                  pending_expected=0 if at_syn_ack else 1,
                  stderr=proc.stderr.read() if proc.stderr else "", exit_code=code)
    finally:
        for p in (held, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        lab.close()


def test_traffic_did_what_the_scenarios_say(run: Run) -> None:
    """Guards the other tests: the kernel saw the intended mix."""
    assert run.deltas["server"]["TCPFastOpenCookieReqd"] == 1
    assert run.deltas["server"]["TCPFastOpenPassive"] == 3 + 5 + 1 + 1 + 1  # + the one held open
    assert run.held == [{"syn_data": True}] * 2
    assert run.deltas["server"]["TCPFastOpenListenOverflow"] == 1
    assert run.deltas["server"]["TCPFastOpenPassiveFail"] == 1
    assert run.deltas["disabled"]["TCPFastOpenCookieReqd"] == 2
    assert run.deltas["disabled"]["TCPFastOpenPassive"] == 0
    assert run.deltas["client"]["TWRecycled"] == 1 and run.reused[0]["reused"] is True
    assert run.ephemeral["refused"] >= 1 and run.ephemeral["granted_after_s"] is not None
    assert run.deltas["tw"]["TWRecycled"] == 1


def test_server_side_per_listener_port(run: Run) -> None:
    # TCPI_OPT_TFO_CHILD exists since 6.16; before, a TFO child with SYN data shows as
    # TCPI_OPT_SYN_DATA on the server socket (every TFO connect here carries data).
    children = Counter(r["port"] for r in run.accepted if r["tfo_child"] or r["syn_data"])
    assert children[PORT_A] != children[PORT_B] and children[PORT_Q] == 1
    ns = run.server.inode
    for port in (PORT_A, PORT_B, PORT_Q):
        assert value(run.samples, "tfowatch_syn_data_accepted_total", netns=ns, port=port) == children[port]
    total = sum(series(run.samples, "tfowatch_syn_data_accepted_total").values())
    assert total == run.deltas["server"]["TCPFastOpenPassive"]


def test_client_side_per_port_and_comm(run: Run) -> None:
    ns = run.client.inode
    acked_total = 0
    for (port, comm, cgroup), rows in run.client_seen.items():
        acked = sum(r["acked"] for r in rows)
        fails = Counter(r["client_fail"] for r in rows)
        labels: dict[str, str | int] = {"netns": ns, "port": port, "comm": comm, "cgroup": cgroup}
        assert value(run.samples, "tfowatch_syn_data_acked_total", **labels) == acked, (port, comm)
        assert value(run.samples, "tfowatch_syn_data_sent_total", **labels) == acked + fails[2] + fails[3]
        for reason, code in (("cookie_unavailable", 1), ("data_not_acked", 2), ("syn_retransmitted", 3)):
            got = value(run.samples, "tfowatch_active_fallbacks_total", reason=reason, **labels)
            assert got == fails[code], (port, comm, reason)
        acked_total += acked
    assert acked_total == run.deltas["client"]["TCPFastOpenActive"] - run.pending_expected
    not_acked = sum(v for lab, v in series(run.samples, "tfowatch_active_fallbacks_total").items()
                    if dict(lab)["reason"] in ("data_not_acked", "syn_retransmitted"))
    assert not_acked == run.deltas["client"]["TCPFastOpenActiveFail"] == 1


def test_unanswered_syn_data_is_sent_but_never_resolved(run: Run) -> None:
    """SYNs whose SYN-ACKs never arrived: data sent, neither acked nor a fallback."""
    labels: dict[str, str | int] = {"netns": run.client.inode, "port": PORT_Q, "comm": Q_COMM,
                                    "cgroup": proc_cgroup(os.getpid())}
    assert value(run.samples, "tfowatch_syn_data_sent_total", **labels) == len(run.held)
    for name in ("tfowatch_syn_data_acked_total", "tfowatch_active_fallbacks_total"):
        assert not [lab for lab in series(run.samples, name) if dict(lab)["port"] == str(PORT_Q)]


def test_kernel_counters_are_exported_per_namespace(run: Run) -> None:
    for key, host in (("client", run.client), ("server", run.server), ("disabled", run.disabled),
                      ("tw", run.tw_client)):
        for counter in COUNTERS:
            got = value(run.samples, "tfowatch_kernel_tcpext_total", netns=host.inode, counter=counter)
            assert got == run.absolute[key][counter], (key, counter)


def test_an_open_connection_is_counted_or_pending(run: Run) -> None:
    """The TFO connection held open through the scrape: counted at its SYN-ACK by sock_ops;
    where outcomes are counted at the end, exported as pending (and not as drift)."""
    ns = run.client.inode
    acked = value(run.samples, "tfowatch_syn_data_acked_total", netns=ns, port=PORT_B, comm=HELD_COMM,
                  cgroup=proc_cgroup(os.getpid()))
    assert acked == 1 - run.pending_expected
    pending = series(run.samples, "tfowatch_syn_data_pending")
    if run.pending_expected:
        assert pending == {frozenset({("netns", str(ns))}): 1}
    else:
        assert not pending


def test_reconcile_drift_is_zero(run: Run) -> None:
    drift = series(run.samples, "tfowatch_reconcile_drift")
    labels = {dict(lab)["metric"] for lab in drift}
    assert {"syn_data_accepted", "syn_data_acked", "active_fail"} <= labels
    assert all(v == 0 for v in drift.values()), drift


def test_self_metrics(run: Run) -> None:
    attached = series(run.samples, "tfowatch_probe_attached")
    assert attached and all(v == 1 for v in attached.values())
    assert value(run.samples, "tfowatch_events_lost_total") == 0
    # The kernel's exact per-type totals equal what reached the metrics.
    sent = value(run.samples, "tfowatch_events_total", type="syn_data_sent")
    assert sent == sum(series(run.samples, "tfowatch_syn_data_sent_total").values()) > 0


def test_tier_specific_metrics(run: Run) -> None:
    s, d = run.server.inode, run.disabled.inode
    assert run.tier == planned_plan(mode=run.mode)["tier"], "the daemon runs below the tier planned"
    if run.tier == "tracepoint":
        for name in ("tfowatch_cookie_requests_total", "tfowatch_tw_reuse_total",
                     "tfowatch_passive_fallbacks_total"):
            assert not series(run.samples, name), f"{name} must be absent in the tracepoint tier"
        return
    assert run.tier in ("kprobe", "sockops")
    assert value(run.samples, "tfowatch_cookie_requests_total", netns=s, port=PORT_A) == 1
    assert value(run.samples, "tfowatch_cookie_requests_total", netns=d, port=PORT_D) == 2
    assert value(run.samples, "tfowatch_cookies_issued_total", netns=s, port=PORT_A) == 2
    assert not series(run.samples, "tfowatch_cookies_issued_total").keys() - {
        frozenset({("netns", str(s)), ("port", str(PORT_A))})}
    fb = "tfowatch_passive_fallbacks_total"
    assert value(run.samples, fb, netns=s, port=PORT_A, reason="invalid_cookie") == 1
    assert value(run.samples, fb, netns=d, port=PORT_D, reason="server_disabled") == 2
    overflow = value(run.samples, fb, netns=s, port=PORT_Q, reason="queue_overflow")
    assert overflow == run.deltas["server"]["TCPFastOpenListenOverflow"] == 1
    assert {dict(lab)["reason"] for lab in series(run.samples, fb)} == {
        "invalid_cookie", "server_disabled", "queue_overflow"}
    tw = "tfowatch_tw_reuse_total"
    for host, key in ((run.client, "client"), (run.tw_client, "tw")):
        granted = sum(v for lab, v in series(run.samples, tw).items()
                      if dict(lab)["result"] == "granted" and dict(lab)["netns"] == str(host.inode))
        assert granted == run.deltas[key]["TWRecycled"] == 1, key
    t = run.tw_client.inode
    refused = {dict(lab)["reason"]: v for lab, v in series(run.samples, tw).items()
               if dict(lab)["netns"] == str(t) and dict(lab)["result"] == "refused"}
    age = "tfowatch_tw_reuse_age_seconds_bucket"
    # Granted once older than the 1 s reuse delay.
    assert value(run.samples, age, netns=t, result="granted", le="0.5") == 0
    assert value(run.samples, age, netns=t, result="granted", le="+Inf") == 1
    if run.tier == "sockops":  # grants only: the refusals are the failed connects
        assert refused == {} and not [lab for lab in series(run.samples, tw)
                                      if dict(lab)["result"] == "refused"]
        return
    assert refused == {"too_recent": run.ephemeral["refused"]}
    assert value(run.samples, age, netns=t, result="refused", le="1.0") == run.ephemeral["refused"]


def test_failed_connects_per_process_and_port(run: Run) -> None:
    """Every connect() the TIME-WAIT client's peer saw fail with EADDRNOTAVAIL, per process and
    remote port, in its namespace; none anywhere else."""
    name = "tfowatch_connect_eaddrnotavail_total"
    got = series(run.samples, name)
    assert got, f"{name} absent in the {run.tier} tier"
    labels: dict[str, str | int] = {"netns": run.tw_client.inode, "port": PORT_TW, "comm": TW_COMM,
                                    "cgroup": proc_cgroup(os.getpid())}
    assert value(run.samples, name, **labels) == run.ephemeral["refused"] >= 1
    assert sum(got.values()) == run.ephemeral["refused"], got


def test_clean_shutdown(run: Run) -> None:
    assert run.exit_code == 0, run.stderr
    assert "Traceback" not in run.stderr
    kprobe_events = Path("/sys/kernel/tracing/kprobe_events")
    if kprobe_events.exists():
        assert "tcp_" not in kprobe_events.read_text()
