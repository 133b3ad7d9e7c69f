"""Network namespaces on this host and their TcpExt counters and sysctls.

A namespace is named by its inode, as the BPF programs report it. Its counters are
read through a process inside it (/proc/PID/net/netstat) or, for a namespace held
only by a bind mount (`ip netns add`), from a short-lived thread that setns()es in.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tfowatch.core import procfs

RUN_NETNS = Path("/run/netns")
T = TypeVar("T")


def inode(path: str | Path) -> int:
    return os.stat(path).st_ino


def self_netns() -> int:
    return inode(procfs.path("self", "ns", "net"))


def discover() -> dict[int, str]:
    """inode -> a handle to enter or read it: '/proc/PID/ns/net' or '/run/netns/NAME'."""
    found: dict[int, str] = {}
    for pid in procfs.pids():
        path = str(procfs.path(pid, "ns", "net"))
        try:
            found.setdefault(inode(path), path)
        except OSError:  # process gone, or a kernel thread
            continue
    if RUN_NETNS.is_dir():
        for entry in os.scandir(RUN_NETNS):
            try:
                found.setdefault(inode(entry.path), entry.path)
            except OSError:
                continue
    return found


def parse_netstat(text: str, section: str = "TcpExt") -> dict[str, int]:
    """The `section` counters of a /proc/net/netstat text (header line, then values)."""
    lines = [line.split() for line in text.splitlines() if line.startswith(section + ":")]
    out: dict[str, int] = {}
    for names, values in zip(lines[0::2], lines[1::2], strict=False):
        out.update(zip(names[1:], (int(v) for v in values[1:]), strict=False))
    return out


def run_in(handle: str, fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has joined the namespace at `handle`."""
    from pyroute2 import netns as pyroute2_netns  # 0.15 s to import: only commands that enter one pay

    box: dict[str, object] = {}

    def target() -> None:
        try:
            # setns() moves only this thread; flags=0: never create a namespace.
            pyroute2_netns.setns(handle, flags=0)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="netns-reader")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def tcpext(handle: str) -> dict[str, int]:
    pid = procfs.pid_of(handle)
    if pid is not None:
        return parse_netstat(procfs.path(pid, "net", "netstat").read_text())
    return run_in(handle, lambda: parse_netstat(procfs.path("thread-self", "net", "netstat").read_text()))


def read_ipv4_sysctls(names: tuple[str, ...]) -> dict[str, str]:
    """net.ipv4 sysctls of the calling thread's namespace; absent ones are left out."""
    out = {}
    for name in names:
        try:
            out[name] = " ".join(procfs.path("sys", "net", "ipv4", name).read_text().split())
        except OSError:
            continue
    return out


def sysctls(handle: str, names: tuple[str, ...]) -> dict[str, str]:
    """net.ipv4 sysctls as seen inside the namespace at `handle`."""
    return run_in(handle, lambda: read_ipv4_sysctls(names))
