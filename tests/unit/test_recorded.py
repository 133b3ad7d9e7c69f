"""The socket-table, listener, TcpExt and TIME-WAIT readers on a recorded /proc tree (no
root): tests/fixtures/procfs/record.py took it from real sockets in test namespaces, with
`ss -Htan` of each namespace beside it as the truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tfowatch.core import netns, procfs
from tfowatch.core.nsconfig import NamespaceConfig
from tfowatch.doctor import listeners, socktable
from tfowatch.doctor.survey import time_wait_per_destination

TREE = Path(__file__).parents[1] / "fixtures" / "procfs" / "tree"
META = json.loads((TREE / "meta.json").read_text())
STATES = {"LISTEN": socktable.LISTEN, "TIME-WAIT": socktable.TIME_WAIT}


@pytest.fixture(autouse=True)
def recorded_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "ROOT", TREE)


def handle(role: str) -> str:
    return str(procfs.path(META[role]["pid"], "ns", "net"))


def split(endpoint: str) -> tuple[str, int | None]:
    addr, port = endpoint.rsplit(":", 1)
    return addr.strip("[]"), None if port == "*" else int(port)


def ss(role: str) -> set[tuple[int, int, str, int | None]]:
    """(state, local port, remote address, remote port) of each socket `ss` listed."""
    out = set()
    for line in (TREE / f"ss-{META[role]['pid']}.txt").read_text().splitlines():
        state, _recv, _send, local, remote = line.split()
        (_, lport), (raddr, rport) = split(local), split(remote)
        assert lport is not None
        out.add((STATES[state], lport, raddr, rport))
    return out


def ours(rows: list[socktable.SocketRow]) -> set[tuple[int, int, str, int | None]]:
    """The same view of socktable's rows: a listener's remote end is ss's '*'."""
    return {(r.state, r.local_port, "*" if r.state == socktable.LISTEN else r.remote,
             None if r.state == socktable.LISTEN else r.remote_port) for r in rows}


def recorded_rows(role: str) -> list[socktable.SocketRow]:
    """The recorded namespace's sockets from its /proc/net/tcp{,6}, through socktable's parser
    (the path of a daemon that may not enter namespaces; tests/host/test_socktable.py checks
    the sock_diag path against ss on real sockets)."""
    return [row for name in ("tcp", "tcp6")
            for row in socktable.parse((TREE / str(META[role]["pid"]) / "net" / name).read_text())]


@pytest.mark.parametrize("role", ["server", "client"])
def test_the_recorded_tables_are_what_ss_listed(role: str) -> None:
    """The fixture itself: its socket tables and ss agree (the rows the tests below use)."""
    want = {(s, lp, "*" if s == socktable.LISTEN else ra, rp) for s, lp, ra, rp in ss(role)}
    assert ours(recorded_rows(role)) == want


def test_listeners_are_named_after_the_processes_holding_them() -> None:
    ino = META["server"]["netns"]
    found = listeners.from_tables({ino: recorded_rows("server")})
    owners = {port: lst.pids for (_, port), lst in found.items()}
    assert owners == {**{p: {META["server"]["pid"]} for p in META["server"]["ports"]},
                      **{p: {META["v6"]["pid"]} for p in META["v6"]["ports"]}}
    comm = {(TREE / str(META[r]["pid"]) / "comm").read_text().strip() for r in ("server", "v6")}
    assert set().union(*(lst.comms for lst in found.values())) == comm


def test_time_wait_is_counted_per_destination_on_ephemeral_ports_only() -> None:
    rows = recorded_rows("client")
    tw_ports = sorted(lp for s, lp, _, _ in ss("client") if s == socktable.TIME_WAIT)
    assert len(tw_ports) == 3
    wide = NamespaceConfig(1, "c", {"ip_local_port_range": f"{tw_ports[0]} {tw_ports[-1]}"})
    assert time_wait_per_destination(rows, wide) == {(META["client"]["server"], 7302): 3}
    narrow = NamespaceConfig(1, "c", {"ip_local_port_range": f"{tw_ports[1]} {tw_ports[-1]}"})
    assert time_wait_per_destination(rows, narrow) == {(META["client"]["server"], 7302): 2}


def test_tcpext_of_a_process_handle_is_its_namespace_netstat() -> None:
    ext = netns.tcpext(handle("client"))
    assert ext["TCPFastOpenActive"] == 0 and "TWRecycled" in ext  # three plain connects only
    assert procfs.pid_of(handle("client")) == META["client"]["pid"]
    assert procfs.pid_of("/run/netns/x") is None
