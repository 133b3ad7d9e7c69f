"""Middleboxes and blackholes (issue 18). A router namespace between the client and the
server does to TFO what the field's paths do (nft rules in its forward chain): strip the
option from the SYN or from the SYN-ACK, drop the SYNs that carry a cookie and data, eat the
SYN-ACKs until the kernel's blackhole detection disables active TFO, eat the answer of a TFO
connection but let the server's FIN through (the kernel's other blackhole check). In each, tfowatch accounts
for every client fallback with a reason that says what happened, per destination port and
process, and its reconcile drift is 0: the truth is the TcpExt counters of the namespaces the
test made and the clients' own tcp_info. IPv4 and IPv6, MSG_FASTOPEN and TCP_FASTOPEN_CONNECT."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from netlab import (
    IN_GUEST,
    DoctorWatch,
    Host,
    Lab,
    Route,
    Samples,
    TopProcess,
    doctor,
    findings,
    free_port,
    scrape,
    series,
    skip_unless_root_bpf,
    start_daemon,
    unit_caps,
)

from tfowatch.core import metrics as m

PORT = 7701
CLOSER = 7702  # a server port that answers, then closes first: its FIN in a segment of its own
ANSWER = "@ih,0,16 0x6f6b"  # the first two bytes of a segment's payload are the server's "ok"
SYN = "tcp flags & (syn | ack) == syn"
SYN_ACK = "tcp flags & (syn | ack) == syn | ack"
# RFC 7413's option and the experimental one (kind 254), which a Linux client tries next when a
# cookie request got no cookie: a middlebox that strips unknown options strips both.
STRIP = ("reset tcp option fastopen", "reset tcp option 254")
BLACKHOLE_TIMEOUT_S = "60"  # the first disable lasts this long: the test's connects fall in it


@dataclass(frozen=True)
class Path:
    family: str  # v4 | v6
    api: str  # sendto (MSG_FASTOPEN) | connect (TCP_FASTOPEN_CONNECT)


# What the VM lab's guests run of the 2 x 2 paths: each behaviour once per family and API.
PATHS = [Path("v4", "sendto"), Path("v6", "connect")] if IN_GUEST else \
    [Path(f, a) for f in ("v4", "v6") for a in ("sendto", "connect")]


@dataclass
class Run:
    """One scenario's traffic: what each client connection saw, and the kernel's counts."""
    client: Host
    server: Host
    rows: list[dict[str, Any]]
    client_delta: dict[str, int]
    server_delta: dict[str, int]

    def rows_where(self, **want: Any) -> int:
        return sum(all(r.get(k) == v for k, v in want.items()) for r in self.rows)


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    skip_unless_root_bpf("middlebox scenarios", "nft")
    listen = f"127.0.0.1:{free_port()}"
    proc = start_daemon(listen, unit_caps("sys-admin.conf"))
    try:
        yield f"http://{listen}/metrics"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def top(daemon: str) -> Iterator[TopProcess | None]:
    """`tfowatch top -o json` beside the daemon, on the host only: its per-destination verdicts
    come from its rows whatever the tier, and each BCC compile costs minutes in a TCG guest."""
    if IN_GUEST:
        yield None
        return
    proc = TopProcess()
    try:
        proc.wait_frames(1)
        yield proc
    finally:
        proc.stop()


def top_shows(top: TopProcess | None, run: Run, verdict: str, counts: dict[str, float],
              active_tfo: dict[str, Any] | None = None) -> None:
    """top's row for the client's destination (the server port, process mbox) has the
    verdict and the fallbacks the kernel counted, and its namespace the kernel's blackhole state."""
    if top is None:
        return
    deadline = time.monotonic() + 15
    while True:
        frame = top.frames[-1]
        rows = [r for r in frame["rows"] if (r["netns"], r["side"], r["port"], r["process"])
                == (run.client.inode, "client", PORT, "mbox")]
        totals = {k: v["total"] for r in rows for k, v in r.items() if isinstance(v, dict) and v["total"]}
        spaces = {ns["netns"]: ns for ns in frame["namespaces"]}
        state = spaces.get(run.client.inode, {}).get("active_tfo")
        got = (rows[0]["path"] if len(rows) == 1 else None, totals,
               {k: state[k] for k in active_tfo} if active_tfo and state else None)
        want = (verdict, counts, active_tfo)
        if got == want:
            return
        assert time.monotonic() < deadline, f"top shows {got}, want {want}"
        time.sleep(0.5)


@pytest.fixture
def route() -> Iterator[tuple[Lab, Route]]:
    lab = Lab()
    try:
        path = lab.routed_server("s", "3")
        lab.start_server(path.server, str(PORT), v6=True)
        yield lab, path
    finally:
        lab.close()


def connects(lab: Lab, route: Route, path: Path, count: int, *extra: str, port: int = PORT
             ) -> list[dict[str, Any]]:
    addr = route.v4 if path.family == "v4" else route.v6
    api = ["--fastopen-connect"] if path.api == "connect" else []
    return lab.client.peer("client", addr, str(port), str(count), "--comm", "mbox", *api, *extra)


def traffic(lab: Lab, route: Route, scenario: Callable[[], list[dict[str, Any]]]) -> Run:
    before = lab.client.tcpext(), route.server.tcpext()
    rows = scenario()
    time.sleep(0.5)  # the last FIN/ACKs
    after = lab.client.tcpext(), route.server.tcpext()
    deltas = [{k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}
              for b, a in zip(before, after, strict=True)]
    return Run(lab.client, route.server, rows, deltas[0], deltas[1])


def tier(samples: Samples) -> str:
    """The tier the daemon runs (its build_info)."""
    return next(dict(lab)["tier"] for name, lab in samples if name == "tfowatch_build_info")


def in_netns(samples: Samples, name: str, host: Host, **labels: str) -> float:
    want = {("netns", str(host.inode)), *labels.items()}
    return sum(v for lab, v in series(samples, name).items() if want <= lab)


def fallbacks(samples: Samples, host: Host, port: int = PORT) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in series(samples, "tfowatch_active_fallbacks_total").items():
        d = dict(lab)
        if d["netns"] == str(host.inode) and v:
            assert (d["port"], d["comm"]) == (str(port), "mbox"), d  # per destination port and process
            out[d["reason"]] = out.get(d["reason"], 0) + v
    return out


def drifts(samples: Samples, *hosts: Host) -> dict[tuple[str, str], float]:
    inodes = {str(h.inode) for h in hosts}
    return {(dict(lab)["netns"], dict(lab)["metric"]): v
            for lab, v in series(samples, "tfowatch_reconcile_drift").items() if dict(lab)["netns"] in inodes}


def counted(url: str, run: Run, want: dict[str, float], port: int) -> Samples:
    """The daemon's samples once it holds `want` (the client's fallbacks by reason, from the
    kernel's truth) with no drift in either namespace; the last samples when it never does."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(url)
        gaps = drifts(samples, run.client, run.server)
        done = fallbacks(samples, run.client, port) == want and not any(gaps.values())
        if done or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def check(url: str, run: Run, want: dict[str, float], port: int = PORT) -> Samples:
    samples = counted(url, run, want, port)
    context = f"rows {run.rows}, client TcpExt +{run.client_delta}, server TcpExt +{run.server_delta}"
    assert fallbacks(samples, run.client, port) == want, context
    gaps = drifts(samples, run.client, run.server)
    moved = any(k.startswith("TCPFastOpen") for k in (*run.client_delta, *run.server_delta))
    assert gaps or not moved, f"TFO counters moved, no reconcile drift series: {context}"
    assert not any(gaps.values()), (gaps, context)
    tfo = [{k: v for k, v in delta.items() if k.startswith("TCPFastOpen")}
           for delta in (run.client_delta, run.server_delta)]
    print(f"kernel: client {tfo[0]}, server {tfo[1]}; tfowatch: {fallbacks(samples, run.client, port)}, "
          f"drift 0 in {len(gaps)} series")  # the record (pytest -s) that closing notes quote
    return samples


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.family}-{p.api}")
def test_option_stripped_from_the_syn(daemon: str, top: TopProcess | None, route: tuple[Lab, Route],
                                      path: Path) -> None:
    """Every connect asks for a cookie; none reaches the server, none comes back."""
    lab, r = route
    r.middlebox(*(f"{SYN} tcp option {opt.split()[-1]} exists {opt}" for opt in STRIP))
    # doctor watches the client on the host (a BCC compile per test costs minutes in a guest)
    with contextlib.nullcontext(None) if IN_GUEST else DoctorWatch(lab.client) as watch:
        run = traffic(lab, r, lambda: connects(lab, r, path, 3))
        report = watch.report()[1] if watch else None
    assert len(run.rows) == 3 and run.rows_where(client_fail=1, acked=False) == 3, run.rows
    assert run.server_delta.get("TCPFastOpenCookieReqd", 0) == 0, run.server_delta
    samples = check(url=daemon, run=run, want={"cookie_unavailable": 3})
    assert in_netns(samples, "tfowatch_cookie_requests_total", run.server) == 0
    top_shows(top, run, "no cookie", {"cookie_unavailable": 3})
    if report is not None:
        [never] = findings(report, "cookie_never_returned", run.client)
        addr = r.v4 if path.family == "v4" else r.v6
        dest = f"[{addr}]:{PORT}" if path.family == "v6" else f"{addr}:{PORT}"
        assert never["evidence"]["destination"] == dest, never
        assert never["evidence"]["cookie_requests_sent"] == 3, never
        assert "removes the TFO option" in never["summary"], never
        print(f"doctor: {never['summary']}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.family}-{p.api}")
def test_cookie_stripped_from_the_syn_ack(daemon: str, top: TopProcess | None, route: tuple[Lab, Route],
                                          path: Path) -> None:
    """The server answers every cookie request with a cookie; the client never gets one."""
    lab, r = route
    r.middlebox(*(f"{SYN_ACK} tcp option {opt.split()[-1]} exists {opt}" for opt in STRIP))
    run = traffic(lab, r, lambda: connects(lab, r, path, 3))
    assert run.rows_where(client_fail=1, acked=False) == 3, run.rows
    assert run.server_delta.get("TCPFastOpenCookieReqd") == 3, run.server_delta
    samples = check(daemon, run, {"cookie_unavailable": 3})
    top_shows(top, run, "no cookie", {"cookie_unavailable": 3})
    if tier(samples) in m.COOKIES_ISSUED.tiers:
        assert in_netns(samples, "tfowatch_cookie_requests_total", run.server) == 3
        assert in_netns(samples, "tfowatch_cookies_issued_total", run.server) == 3


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.family}-{p.api}")
def test_syns_with_a_cookie_dropped(daemon: str, top: TopProcess | None, route: tuple[Lab, Route],
                                    path: Path) -> None:
    """The cookie request passes; every SYN that carries the cookie and data is dropped, the
    kernel retransmits it without them a second later, and the data goes after the handshake.
    The destination's SYN drops are in the kernel's TCP metrics cache."""
    lab, r = route
    r.middlebox(f"{SYN} tcp option fastopen length > 2 drop")
    run = traffic(lab, r, lambda: connects(lab, r, path, 3))
    assert run.rows_where(client_fail=1) == 1 and run.rows_where(client_fail=3, acked=False) == 2, run.rows
    assert run.client_delta.get("TCPFastOpenActiveFail") == 2, run.client_delta
    check(daemon, run, {"cookie_unavailable": 1, "syn_retransmitted": 2})
    top_shows(top, run, "drops SYN data",
              {"cookie_unavailable": 1, "syn_data_sent": 2, "syn_retransmitted": 2})
    metrics = subprocess.run(["ip", "-n", run.client.name, "tcp_metrics", "show"], capture_output=True,
                             text=True, check=True).stdout
    assert "fo_syn_drops 2/" in metrics, metrics
    # doctor names it from the kernel's metrics cache, and says what it costs
    _, report = doctor(run.client)
    [dropped] = findings(report, "syn_data_dropped", run.client)
    addr = r.v4 if path.family == "v4" else r.v6
    assert dropped["evidence"] == {"address": addr, "fo_syn_drops": 2, "cookie_cached": True}, dropped
    assert "keeps sending SYN data" in dropped["summary"], dropped
    print(f"doctor: {dropped['summary']}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.family}-{p.api}")
def test_syn_acks_eaten_until_active_tfo_is_disabled(daemon: str, top: TopProcess | None,
                                                     route: tuple[Lab, Route], path: Path) -> None:
    """A TFO connect whose SYN-ACKs never arrive: at its third SYN timeout the kernel counts
    TCPFastOpenActiveFail and, the blackhole timeout being set, disables active TFO in the
    namespace (TCPFastOpenBlackhole); the connects after it send no TFO option at all."""
    lab, r = route
    lab.client.sysctl("net.ipv4.tcp_fastopen_blackhole_timeout_sec", BLACKHOLE_TIMEOUT_S)

    def scenario() -> list[dict[str, Any]]:
        r.middlebox(f"tcp sport {PORT} {SYN_ACK} drop")
        eaten = connects(lab, r, path, 1, "--give-up-on-timeout")
        r.clear_middlebox()
        return eaten + connects(lab, r, path, 2)

    started = time.time()
    run = traffic(lab, r, scenario)
    eaten, after = run.rows[0], run.rows[1:]  # a cookie request (a new client), then no option
    assert eaten["detected"] and eaten["client_fail"] == 1, run.rows
    assert after == [{"acked": False, "client_fail": 0}] * 2, run.rows
    detected = run.client_delta.get("TCPFastOpenActiveFail"), run.client_delta.get("TCPFastOpenBlackhole")
    assert detected == (1, 1), run.client_delta
    assert run.server_delta.get("TCPFastOpenPassive", 0) == 0, run.server_delta  # no SYN data reached it
    samples = check(daemon, run, {"cookie_unavailable": 1, "tfo_timeout": 1, "tfo_disabled": 2})
    if tier(samples) in m.BLACKHOLE_DISABLES.tiers:
        assert in_netns(samples, "tfowatch_blackhole_disables_total", run.client, port=str(PORT)) == 1
    # The kernel's own state: disabled now (the connects after it sent no option), once since
    # TFO last worked, retried within the blackhole timeout, disabled during this run.
    state = {name: in_netns(samples, name, run.client) for name in
             ("tfowatch_active_tfo_disabled", "tfowatch_active_tfo_disable_count",
              "tfowatch_active_tfo_reenable_seconds", "tfowatch_active_tfo_last_disable_timestamp_seconds")}
    at = state.pop("tfowatch_active_tfo_last_disable_timestamp_seconds")
    assert started - 1 < at < time.time(), (at - started, state)
    left = state.pop("tfowatch_active_tfo_reenable_seconds")
    assert 0 < left < float(BLACKHOLE_TIMEOUT_S) - (time.time() - at) + 1, (left, time.time() - at)
    assert state == {"tfowatch_active_tfo_disabled": 1, "tfowatch_active_tfo_disable_count": 1}, state
    top_shows(top, run, "timeouts", {"cookie_unavailable": 1, "tfo_timeout": 1, "tfo_disabled": 2},
              {"disabled": True, "disable_count": 1})
    _, report = doctor(run.client)
    [blackholed] = findings(report, "active_tfo_blackholed", run.client)
    assert blackholed["evidence"]["TCPFastOpenBlackhole"] == 1, blackholed
    assert blackholed["evidence"]["blackhole_timeout_s"] == int(BLACKHOLE_TIMEOUT_S), blackholed
    print(f"doctor: {blackholed['summary']}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.family}-{p.api}")
def test_an_answer_eaten_with_its_fin_let_through_disables_active_tfo(
        daemon: str, route: tuple[Lab, Route], path: Path) -> None:
    """A TFO connection whose SYN data the server acked, whose answer the path eats while the
    server's FIN gets through: the client gives up holding no data and only that FIN, out of
    order, and as its socket goes the kernel's other blackhole check disables active TFO
    (TCPFastOpenBlackhole without TCPFastOpenActiveFail). tfowatch replays that check (a kprobe
    where the kernel runs it, or sock_ops as the TFO client closes): the disable is counted per
    destination port, reconciled, and doctor names this cause, not a timeout."""
    lab, r = route
    lab.start_server(r.server, f"{CLOSER}:64:close", v6=True)
    lab.client.sysctl("net.ipv4.tcp_fastopen_blackhole_timeout_sec", BLACKHOLE_TIMEOUT_S)

    def scenario() -> list[dict[str, Any]]:
        first = connects(lab, r, path, 1, port=CLOSER)  # a cookie request: answered, with a cookie
        r.middlebox(f"tcp sport {CLOSER} {ANSWER} drop")
        eaten = connects(lab, r, path, 1, "--unanswered", port=CLOSER)
        r.clear_middlebox()
        return first + eaten + connects(lab, r, path, 1, port=CLOSER)

    run = traffic(lab, r, scenario)
    first, eaten, after = run.rows
    assert first == {"acked": False, "client_fail": 1}, run.rows
    assert eaten == {"acked": True, "client_fail": 0, "answered": False}, run.rows
    assert after == {"acked": False, "client_fail": 0}, run.rows  # disabled: no TFO option sent
    assert run.client_delta.get("TCPFastOpenBlackhole") == 1, run.client_delta
    assert "TCPFastOpenActiveFail" not in run.client_delta, run.client_delta
    samples = check(daemon, run, {"cookie_unavailable": 1, "tfo_disabled": 1}, port=CLOSER)
    if tier(samples) in m.BLACKHOLE_DISABLES.tiers:
        assert in_netns(samples, "tfowatch_blackhole_disables_total", run.client, port=str(CLOSER)) == 1
    assert in_netns(samples, "tfowatch_active_tfo_disabled", run.client) == 1
    _, report = doctor(run.client)
    [blackholed] = findings(report, "active_tfo_blackholed", run.client)
    assert blackholed["evidence"]["TCPFastOpenBlackhole"] == 1, blackholed
    assert "received no data but the server's FIN" in blackholed["summary"], blackholed
    assert "timed out" not in blackholed["summary"], blackholed
    print(f"doctor: {blackholed['summary']}")
