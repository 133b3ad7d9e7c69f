"""The socket tables top and doctor read (sock_diag, filtered by state in the kernel) against
`ss` in namespaces this test makes: listeners on IPv4 and IPv6 with their owners, TIME-WAIT
sockets per destination on IPv4 and IPv6. No BPF."""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import pytest
from netlab import Lab

from tfowatch.core.nsconfig import NamespaceConfig
from tfowatch.doctor import listeners, socktable
from tfowatch.doctor.survey import time_wait_per_destination

PORTS = (7801, 7802)


def ss(ns: str, state: str) -> list[tuple[int, str, int]]:
    """(local port, remote address, remote port) of each socket `ss` lists in that state."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htan", "state", state], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        _recv, _send, local, remote = line.split()[-4:]
        raddr, rport = remote.rsplit(":", 1)
        addr = raddr.strip("[]").removeprefix("::ffff:")
        rows.append((int(local.rsplit(":", 1)[1]), addr, 0 if rport == "*" else int(rport)))
    return rows


def test_listeners_and_time_wait_are_what_ss_lists(lab: Lab) -> None:
    if os.geteuid() != 0:
        pytest.skip("socket table test: needs root for namespaces")
    srv, addr = lab.server("s", "3")
    lab.start_server(srv, *(str(p) for p in PORTS), v6=True)
    route_v6 = lab.routed_server("r", "3")  # an IPv6 destination for TIME-WAIT
    lab.start_server(route_v6.server, str(PORTS[0]), v6=True)
    # The client closes first: its side keeps the TIME-WAIT sockets.
    lab.client.peer("client", addr, str(PORTS[0]), "3", "--plain")
    lab.client.peer("client", route_v6.v6, str(PORTS[0]), "2", "--plain")
    rows = socktable.read(lab.client.handle)
    tw = [(r.local_port, r.remote, r.remote_port) for r in rows if r.state == socktable.TIME_WAIT]
    assert sorted(tw) == sorted(ss(lab.client.name, "time-wait")), (tw, ss(lab.client.name, "time-wait"))
    assert Counter((a, p) for _, a, p in tw) == {(addr, PORTS[0]): 3, (route_v6.v6, PORTS[0]): 2}
    config = NamespaceConfig(lab.client.inode, lab.client.name, {"ip_local_port_range": "1024 65535"})
    assert time_wait_per_destination(rows, config) == {(addr, PORTS[0]): 3, (route_v6.v6, PORTS[0]): 2}
    # The server's listeners, IPv4 and IPv6 alike, named after the peer process that holds them.
    srv_rows = socktable.read(srv.handle, socktable.LISTENERS)
    assert {r.state for r in srv_rows} == {socktable.LISTEN}
    assert sorted(r.local_port for r in srv_rows) == sorted(p for p, _, _ in ss(srv.name, "listening"))
    found = listeners.discover(only={srv.inode})
    assert sorted(port for _, port in found) == sorted(PORTS)
    assert all(lst.pids and lst.comms for lst in found.values()), found
