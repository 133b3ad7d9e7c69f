"""Listening TCP sockets per network namespace and the processes that hold them.

The BPF programs see a listener as (netns, port) in softirq context, with no process;
this module names the process, for `top` rows and for `doctor`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tfowatch import netns

TCP_LISTEN = "0A"


@dataclass
class Listener:
    netns: int
    port: int
    inodes: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    comms: set[str] = field(default_factory=set)


def parse_proc_net_tcp(text: str) -> list[tuple[int, int]]:
    """(port, socket inode) of each LISTEN socket in a /proc/net/tcp{,6} text."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[3] == TCP_LISTEN:
            out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[9])))
    return out


def _listening(handle: str) -> list[tuple[int, int]]:
    def read(base: str) -> list[tuple[int, int]]:
        found = []
        for name in ("tcp", "tcp6"):
            try:
                found += parse_proc_net_tcp(Path(f"{base}/net/{name}").read_text())
            except OSError:
                continue
        return found

    if handle.startswith("/proc/"):
        return read(handle.rsplit("/ns/", 1)[0])
    return netns.run_in(handle, lambda: read("/proc/thread-self"))


def socket_owners() -> dict[int, set[int]]:
    """socket inode -> pids holding it, from every process's fd table."""
    owners: dict[int, set[int]] = defaultdict(set)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            with fds:
                for fd in fds:
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        owners[int(target[8:-1])].add(int(entry.name))
        except OSError:  # process gone or fd closed meanwhile
            continue
    return owners


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def discover(only: set[int] | None = None,
             handles: dict[int, str] | None = None) -> dict[tuple[int, int], Listener]:
    """(netns inode, port) -> Listener for every namespace (or those in `only`); `handles`
    is netns.discover()'s result when the caller has it already."""
    found: dict[tuple[int, int], Listener] = {}
    for ino, handle in (netns.discover() if handles is None else handles).items():
        if only is not None and ino not in only:
            continue
        try:
            for port, inode in _listening(handle):
                found.setdefault((ino, port), Listener(ino, port)).inodes.add(inode)
        except OSError:  # namespace vanished
            continue
    if not found:
        return found
    owners = socket_owners()
    for lst in found.values():
        for inode in lst.inodes:
            lst.pids |= owners.get(inode, set())
        lst.comms = {c for c in map(_comm, lst.pids) if c}
    return found
