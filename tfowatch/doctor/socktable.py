"""The TCP sockets of one network namespace, from the kernel's sock_diag filtered by state
(sockdiag.py): what `top` (listeners, every interval) and `doctor` (listeners and TIME-WAIT
sockets per destination) need, fast enough for the 100k TIME-WAIT sockets of a host that ran
out of ports (docs/PERFORMANCE.md: doctor 1.46 s → 0.98 s, a top interval 0.69 s → 0.04 s at 100k)."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from tfowatch.core import netns, procfs
from tfowatch.doctor import sockdiag

LISTEN = 0x0A
TIME_WAIT = 0x06
LISTENERS = 1 << LISTEN
LISTENERS_AND_TIME_WAIT = LISTENERS | 1 << TIME_WAIT


class SocketRow(NamedTuple):  # a tuple: 100k of them are made per doctor run
    state: int
    local_port: int
    remote: str  # address as text
    remote_port: int
    inode: int


def _address(hex_addr: str) -> str:
    """/proc/net/tcp prints each 32-bit word of the address in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)  # a v4 peer of a dual-stack socket
    return str(mapped or ip)


def parse(text: str) -> list[SocketRow]:
    """Rows of a /proc/net/tcp{,6} text: the path of a daemon without CAP_SYS_ADMIN, which may
    not enter a namespace for sock_diag but may read a process's /proc/PID/net."""
    rows = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local_port = int(f[1].rsplit(":", 1)[1], 16)
        remote, remote_port = f[2].rsplit(":", 1)
        rows.append(SocketRow(int(f[3], 16), local_port, _address(remote), int(remote_port, 16),
                              int(f[9])))
    return rows


def _own(states: int) -> list[SocketRow]:
    names: dict[bytes, str] = {}  # each remote address converted once: 100k sockets, few peers
    rows = []
    for state, lport, raddr, rport, inode, _family in sockdiag.dump(states):
        name = names.get(raddr)
        if name is None:
            name = names[raddr] = sockdiag.address(raddr)
        rows.append(SocketRow(state, lport, name, rport, inode))
    return rows


def read(handle: str, states: int = LISTENERS_AND_TIME_WAIT) -> list[SocketRow]:
    """The TCP sockets (v4 and v6) in `states` of the namespace at `handle` (netns.discover())."""
    try:
        return netns.run_in(handle, lambda: _own(states))
    except PermissionError:  # setns() needs CAP_SYS_ADMIN, which the unit does not grant
        pid = procfs.pid_of(handle)
        if pid is None:
            raise
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            rows += parse(procfs.path(pid, "net", name).read_text())
        except OSError:  # no IPv6, or the process is gone
            continue
    return [r for r in rows if states & (1 << r.state)]
