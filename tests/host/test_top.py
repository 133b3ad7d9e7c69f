"""`tfowatch top` on the running kernel: real TFO traffic between namespaces this test
creates. The JSON lines must equal what the peers saw and the namespaces' TcpExt deltas;
filters must keep exactly what they name. Runs on the host (sockops tier) and in the
VM lab (kprobe tier)."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netlab import BPF_START_S, IN_GUEST, TFOWATCH, Host, Lab, TopProcess, skip_unless_root_bpf

PORT_A, PORT_B = 7101, 7102
COUNTERS = ("TCPFastOpenActive", "TCPFastOpenPassive", "TCPFastOpenCookieReqd")


def frames_of(tops: list[TopProcess], n: int) -> list[dict[str, Any]]:
    return tops[n].frames if n < len(tops) else []


@dataclass
class Session:
    client: Host
    server: Host
    server_comm: str
    client_seen: dict[tuple[int, str], list[dict[str, Any]]]
    accepted: list[dict[str, Any]]
    deltas: dict[str, dict[str, int]]
    frames: list[dict[str, Any]]
    by_pid_port: list[dict[str, Any]]  # -p SERVER --port PORT_B
    by_netns: list[dict[str, Any]]     # --netns CLIENT-NAME
    capped: list[dict[str, Any]]       # --netns CLIENT-NAME --series-cap 1
    exits: list[tuple[int, str]]


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    skip_unless_root_bpf("top test")
    lab = Lab()
    tops: list[TopProcess] = []
    try:
        srv, addr = lab.server("s", "3")
        log = lab.start_server(srv, str(PORT_A), str(PORT_B))
        server_pid = lab.procs[0].pid
        server_comm = Path(f"/proc/{server_pid}/comm").read_text().strip()
        tops = [TopProcess()]
        if not IN_GUEST:  # the filters' tests are host_only: three BCC compiles fewer in a guest
            tops += [TopProcess("-p", str(server_pid), "--port", str(PORT_B)),
                     TopProcess("--netns", lab.client.name),
                     TopProcess("--netns", lab.client.name, "--series-cap", "1")]
        for t in tops:
            t.wait_frames(1)
        hosts = {"client": lab.client, "server": srv}
        before = {k: h.tcpext() for k, h in hosts.items()}
        seen: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for port, count, comm in ((PORT_A, 1, "top-a"), (PORT_A, 2, "top-a"), (PORT_B, 4, "top-b")):
            rows = lab.client.peer("client", addr, str(port), str(count), "--comm", comm)
            seen.setdefault((port, comm), []).extend(rows)
        accepted = lab.accepted(log)
        after = {k: h.tcpext() for k, h in hosts.items()}
        for t in tops:  # two more frames: both start after the last event was submitted
            t.wait_frames(len(t.frames) + 2)
        exits = [t.stop() for t in tops]
        yield Session(client=lab.client, server=srv, server_comm=server_comm, client_seen=seen,
                      accepted=accepted,
                      deltas={k: {c: after[k][c] - before[k][c] for c in COUNTERS} for k in hosts},
                      frames=tops[0].frames, by_pid_port=frames_of(tops, 1), by_netns=frames_of(tops, 2),
                      capped=frames_of(tops, 3), exits=exits)
    finally:
        for t in tops:
            if t.proc.poll() is None:
                t.proc.kill()
        lab.close()


def rows_of(frame: dict[str, Any], netns: int) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(r["side"], r["port"], r["process"]): r for r in frame["rows"] if r["netns"] == netns}


def test_server_rows_equal_the_accepted_connections(session: Session) -> None:
    last = session.frames[-1]
    rows = rows_of(last, session.server.inode)
    children = Counter(r["port"] for r in session.accepted if r["tfo_child"] or r["syn_data"])
    assert children[PORT_A] == 2 and children[PORT_B] == 4
    total = 0
    for port in (PORT_A, PORT_B):
        row = rows[("server", port, session.server_comm)]  # named after the listener's process
        assert row["syn_data_accepted"]["total"] == children[port]
        total += row["syn_data_accepted"]["total"]
    assert total == session.deltas["server"]["TCPFastOpenPassive"]
    req = rows[("server", PORT_A, session.server_comm)]["cookie_requests"]
    if last["tier"] in ("kprobe", "sockops"):
        assert req["total"] == session.deltas["server"]["TCPFastOpenCookieReqd"] == 1
    else:
        assert req is None  # the tracepoint tier cannot see cookie requests: n/a, not 0


def test_client_rows_equal_what_the_client_saw(session: Session) -> None:
    rows = rows_of(session.frames[-1], session.client.inode)
    acked_total = 0
    for (port, comm), seen in session.client_seen.items():
        row = rows[("client", port, comm)]
        acked = sum(r["acked"] for r in seen)
        no_cookie = sum(r["client_fail"] == 1 for r in seen)
        assert row["syn_data_acked"]["total"] == acked
        assert row["syn_data_sent"]["total"] == acked
        assert row["cookie_unavailable"]["total"] == no_cookie
        acked_total += acked
    assert acked_total == 2 + 4 == session.deltas["client"]["TCPFastOpenActive"]


def test_interval_deltas_add_up_to_totals(session: Session) -> None:
    sums: Counter[tuple[Any, ...]] = Counter()
    for frame in session.frames:
        for r in frame["rows"]:
            for key, v in r.items():
                if isinstance(v, dict) and "delta" in v:
                    sums[(r["netns"], r["side"], r["port"], r["process"], key)] += v["delta"]
    last = session.frames[-1]
    for r in last["rows"]:
        for key, v in r.items():
            if isinstance(v, dict) and "total" in v:
                assert sums[(r["netns"], r["side"], r["port"], r["process"], key)] == v["total"]


def test_header_facts(session: Session) -> None:
    last = session.frames[-1]
    assert last["lost"] == 0
    spaces = {ns["netns"]: ns for ns in last["namespaces"]}
    srv = spaces[session.server.inode]
    assert srv["name"] == session.server.name
    assert srv["tcp_fastopen"] == "0x3" and srv["tcp_fastopen_flags"] == ["client", "server"]
    assert srv["tcpext_since_start"]["TCPFastOpenPassive"] == session.deltas["server"]["TCPFastOpenPassive"]
    assert all(v == 0 for ns in spaces.values() for v in ns["drift"].values())


@pytest.mark.host_only
def test_pid_and_port_filters_keep_only_what_they_name(session: Session) -> None:
    """-p names the server: its listeners' rows stay, the clients' (other pids) go."""
    last = session.by_pid_port[-1]
    keys = {(r["netns"], r["side"], r["port"], r["process"]) for r in last["rows"]}
    assert keys == {(session.server.inode, "server", PORT_B, session.server_comm)}
    (row,) = last["rows"]
    assert row["syn_data_accepted"]["total"] == 4


@pytest.mark.host_only
def test_netns_filter_by_name(session: Session) -> None:
    last = session.by_netns[-1]
    keys = {(r["side"], r["port"], r["process"]) for r in last["rows"]}
    assert {r["netns"] for r in last["rows"]} == {session.client.inode}
    assert keys == {("client", port, comm) for port, comm in session.client_seen}


def test_stops_cleanly(session: Session) -> None:
    for code, err in session.exits:
        assert code == 0 and "Traceback" not in err, err


@pytest.mark.host_only
def test_once_prints_a_plain_table_without_escape_codes(root_bpf: None) -> None:
    out = subprocess.run([str(TFOWATCH), "top", "--once", "-i", "0.2"], capture_output=True,
                         text=True, timeout=BPF_START_S + 30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tfowatch top  kernel ")
    assert any(line.split()[:4] == ["NETNS", "SIDE", "PORT", "PROCESS"] for line in lines)
    assert "\x1b" not in out.stdout


@pytest.mark.host_only
def test_bad_flags_are_one_line_errors() -> None:
    for args in (["--interval", "0"], ["--interval", "inf"], ["--interval", "1e300"], ["--sort", "nope"],
                 ["--port", "70000"], ["--netns", "no-such-ns"], ["--count", "-1"]):
        out = subprocess.run([str(TFOWATCH), "top", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, args


@pytest.mark.host_only
def test_rows_over_the_series_cap_fold_into_other_and_say_so(session: Session) -> None:
    """Two client label sets under --series-cap 1: the second folds into an 'other' row, the
    frame says how many events went there, and nothing is lost in the fold."""
    def sent(frame: dict[str, Any]) -> int:
        return sum(r["syn_data_sent"]["total"] for r in frame["rows"]
                   if r["side"] == "client" and r.get("syn_data_sent"))

    capped, full = session.capped[-1], session.by_netns[-1]
    assert capped["series_cap"] == 1 and capped["folded"] > 0, capped
    assert any(r["process"] == "other" for r in capped["rows"]), capped["rows"]
    assert full["series_cap"] == 1000 and full["folded"] == 0 and full["failed_parts"] == []
    assert sent(capped) == sent(full) > 0
