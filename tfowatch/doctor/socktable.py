"""The kernel's TCP socket tables (/proc/net/tcp and tcp6) of one network namespace."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from tfowatch.core import netns, procfs

LISTEN = 0x0A
TIME_WAIT = 0x06


@dataclass(frozen=True)
class SocketRow:
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


def read(handle: str) -> list[SocketRow]:
    """Every TCP socket (v4 and v6) of the namespace at `handle` (netns.discover())."""
    def from_base(base: str) -> list[SocketRow]:
        found = []
        for name in ("tcp", "tcp6"):
            try:
                found += parse(Path(f"{base}/net/{name}").read_text())
            except OSError:  # no IPv6, or the process is gone
                continue
        return found

    pid = procfs.pid_of(handle)
    if pid is not None:
        return from_base(str(procfs.path(pid)))
    return netns.run_in(handle, lambda: from_base(str(procfs.path("thread-self"))))
