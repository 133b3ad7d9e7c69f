"""Network namespaces on this host and their TcpExt counters and sysctls.

A namespace is named by its inode, as the BPF programs report it. Its counters are
read through a process inside it (/proc/PID/net/netstat) or, for a namespace held
only by a bind mount (`ip netns add`), from a short-lived thread that setns()es in.

The kernel gives a dead namespace's inode to the next new one at once, so an inode alone
does not say which namespace it is: its cookie does (SO_NETNS_COOKIE, Linux 5.14; the BPF
programs read the same `net->net_cookie`), unique for the boot.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

from tfowatch.core import procfs

log = logging.getLogger(__name__)
RUN_NETNS = Path("/run/netns")
SO_NETNS_COOKIE = 71  # asm-generic/socket.h
CLONE_NEWNET = 0x40000000  # linux/sched.h
T = TypeVar("T")


def inode(path: str | Path) -> int:
    return os.stat(path).st_ino


def self_netns() -> int:
    return inode(procfs.path("self", "ns", "net"))


def discover() -> dict[int, str]:
    """inode -> a handle to enter or read it: '/proc/PID/ns/net' or '/run/netns/NAME'."""
    found: dict[int, str] = {}
    for pid in procfs.pids():
        path = procfs.ns_handle(pid)
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
    """The `section` counters of a /proc/net/netstat text (header line, then values): the
    kernel's only interface to its MIB counters, which pyroute2 and psutil do not read."""
    lines = [line.split() for line in text.splitlines() if line.startswith(section + ":")]
    out: dict[str, int] = {}
    for names, values in zip(lines[0::2], lines[1::2], strict=False):
        out.update(zip(names[1:], (int(v) for v in values[1:]), strict=False))
    return out


def _setns(handle: str) -> None:
    """Move the calling thread into the network namespace at `handle` (a path, or a name
    under /run/netns). Through libc, not pyroute2's netns.setns (which does the same call):
    importing pyroute2 took 0.15 s and 12.7 MB of the daemon's anonymous memory, a third of
    its budget, for this one syscall (docs/PERFORMANCE.md). Python 3.12 has os.setns."""
    path = handle if handle.startswith("/") else str(RUN_NETNS / handle)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:  # CLONE_NEWNET: refuse any other namespace kind
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def run_in(handle: str, fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has joined the namespace at `handle`."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            _setns(handle)  # moves only this thread, which ends after fn
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="netns-reader")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _own_tcpext() -> dict[str, int]:
    return parse_netstat(procfs.path("thread-self", "net", "netstat").read_text())


def tcpext(handle: str) -> dict[str, int]:
    pid = procfs.pid_of(handle)
    if pid is not None:
        with open(procfs.pid_file(pid, "net", "netstat")) as f:
            return parse_netstat(f.read())
    return run_in(handle, _own_tcpext)


def own_cookie() -> int:
    """The cookie of the calling thread's namespace; 0 where the kernel has none (before 5.14)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:  # ENOPROTOOPT
        return 0


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for the boot."""
    with open(procfs.pid_file(pid, "stat")) as f:
        stat = f.read()
    return int(stat.rsplit(")", 1)[1].split()[19])


class Generations:
    """Which namespace holds each inode now, by cookie, as events and counter reads show it.
    `admit(inode, cookie)` is True for the current namespace; for another cookie it first calls
    `replaced(inode, cookie)` (the old namespace is gone: its series go) and is True; for one
    already replaced it is False (a late event: counted in `late`). Cookies are unique but not
    ordered (the kernel hands them out in per-CPU batches), hence the memory of replaced ones.
    Callers hold `lock` from admit() until the event is counted, so that no replacement runs
    between the two (it is reentrant: replaced() may take it again)."""

    GONE_KEPT = 8  # replaced cookies remembered per inode: a late event comes within a read

    def __init__(self, replaced: Callable[[int, int], None], enabled: bool = True) -> None:
        self.replaced = replaced
        self.enabled = enabled
        self.lock = threading.RLock()
        self._cookie: dict[int, int] = {}
        self._gone: dict[int, deque[int]] = {}
        self.reused = 0  # inodes a new namespace took over
        self.late = 0

    def current(self, ino: int) -> int | None:
        """The cookie of the namespace holding inode `ino` now, if known."""
        with self.lock:
            return self._cookie.get(ino)

    def seed(self, cookies: dict[int, int]) -> None:
        with self.lock:
            self._cookie.update((ino, c) for ino, c in cookies.items() if c)

    def admit(self, ino: int, cookie: int, n: int = 1) -> bool:
        if not (self.enabled and cookie):
            return True
        with self.lock:
            now = self._cookie.setdefault(ino, cookie)
            if cookie == now:
                return True
            gone = self._gone.setdefault(ino, deque(maxlen=self.GONE_KEPT))
            if cookie in gone:
                self.late += n
                return False
            gone.append(now)
            self._cookie[ino] = cookie
            self.reused += 1
            self.replaced(ino, cookie)
            return True

    def retire(self, ino: int) -> None:
        """The namespace at `ino` is gone, as something other than a cookie showed (its
        counters went down): replace it by one not seen yet."""
        with self.lock:
            now = self._cookie.pop(ino, None)
            if now is not None:
                self._gone.setdefault(ino, deque(maxlen=self.GONE_KEPT)).append(now)
            self.reused += 1
            self.replaced(ino, 0)

    def forget(self, inodes: set[int]) -> None:
        with self.lock:
            for ino in inodes:
                self._cookie.pop(ino, None)
                self._gone.pop(ino, None)


class Cookies:
    """Which namespace each inode found is, by cookie, asked of the kernel (by entering it)
    once per witness: the process it was found through, named by pid and start time. A live
    process keeps its namespace alive, so while the same process is found in it no new
    namespace can have taken the inode (unless that process left, the namespace died, and the
    process joined a new one that got the inode, all between two reads). A namespace held
    only by a bind mount is entered at each read anyway, which tells its cookie for free."""

    def __init__(self) -> None:
        self.supported = own_cookie() != 0
        self.denied = False  # entering a namespace was refused
        self._seen: dict[tuple[int, int, int], int] = {}
        self._now: dict[tuple[int, int, int], int] = {}

    def read(self, ino: int, handle: str) -> tuple[dict[str, int], int]:
        """The TcpExt counters of the namespace at `handle`, and its cookie (0: unknown)."""
        pid = procfs.pid_of(handle)
        if pid is None:
            counters, cookie = run_in(handle, lambda: (_own_tcpext(), own_cookie()))
            return counters, cookie if self.supported else 0
        counters = tcpext(handle)
        if not self.supported:
            return counters, 0
        witness = (ino, pid, _start_time(pid))
        cookie = self._seen.get(witness) or self._ask(handle)
        if inode(handle) != ino:  # the witness moved while it was read: ask again next time
            raise FileNotFoundError(f"{handle} left namespace {ino}")
        self._now[witness] = cookie
        return counters, cookie

    def _ask(self, handle: str) -> int:
        """The cookie of the namespace at `handle`, by entering it; 0 without CAP_SYS_ADMIN
        (then a reused inode is told apart by its events only: said once)."""
        try:
            return run_in(handle, own_cookie)
        except PermissionError:
            if not self.denied:
                self.denied = True
                log.warning("cannot enter network namespaces (no CAP_SYS_ADMIN) to read their cookies: "
                            "a namespace that gets a gone one's inode is told apart by its events only")
            return 0

    def done(self) -> None:
        """End of one read of every namespace: witnesses not seen in it are forgotten."""
        self._seen, self._now = self._now, {}


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
