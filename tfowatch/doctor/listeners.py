"""Listening TCP sockets per network namespace and the processes that hold them.

The BPF programs see a listener as (netns, port) in softirq context, with no process;
this module names the process, for `top` rows and for `doctor`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from tfowatch.core import netns, procfs
from tfowatch.doctor import socktable

TCP_FASTOPEN = 23  # on a listener: the TFO queue length, 0 when TFO is off
SYS_PIDFD_GETFD = 438  # x86_64 and arm64 (asm-generic) alike; Linux 5.6+
# sock_diag reports a listener's accept queue, not its TFO queue: that is read from the socket.
TFO_QLEN_SOURCE = "getsockopt(TCP_FASTOPEN) on a pidfd_getfd duplicate of a holder's fd"


@dataclass
class Listener:
    netns: int
    port: int
    inodes: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    comms: set[str] = field(default_factory=set)
    fds: set[tuple[int, int]] = field(default_factory=set)  # (pid, fd) holding the socket
    tfo_qlen: int | None = None  # TCP_FASTOPEN queue length; None = could not be read


def socket_owners() -> dict[int, set[tuple[int, int]]]:
    """socket inode -> (pid, fd) pairs holding it, from every process's fd table. The fd
    tables are the kernel's only record of who holds a socket (sock_diag gives its inode, not
    its holders); psutil's net_connections() maps the same links for the caller's namespace
    only, and its per-process form reads the whole socket table again for each process."""
    owners: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for pid in procfs.pids():
        try:
            with os.scandir(procfs.path(pid, "fd")) as fds:
                for fd in fds:
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        owners[int(target[8:-1])].add((pid, int(fd.name)))
        except OSError:  # process gone or fd closed meanwhile
            continue
    return owners


def _comm(pid: int) -> str | None:
    try:
        return procfs.path(pid, "comm").read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def duplicate(pid: int, fd: int) -> Iterator[socket.socket | None]:
    """A duplicate of process `pid`'s socket `fd` (pidfd_getfd, which needs ptrace access: the
    unit's CAP_SYS_PTRACE), or None when the process or fd is gone or the kernel refuses.
    Closing the duplicate leaves theirs open."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        yield None
        return
    try:
        dup = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if dup < 0:
        yield None
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # the fd was closed and reused for something else meanwhile
        os.close(dup)
        yield None
        return
    with sock:
        yield sock


def tfo_queue_len(pid: int, fd: int) -> int | None:
    """A listener's TCP_FASTOPEN queue length, read with getsockopt() on a duplicate of its
    fd: the socket option is the only per-listener record of it the kernel gives. None when
    the process or fd is gone, or the kernel refuses."""
    with duplicate(pid, fd) as sock:
        if sock is None:
            return None
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN)
        except OSError:
            return None


def discover(only: set[int] | None = None,
             handles: dict[int, str] | None = None) -> dict[tuple[int, int], Listener]:
    """(netns inode, port) -> Listener for every namespace (or those in `only`); `handles`
    is netns.discover()'s result when the caller has it already."""
    tables: dict[int, list[socktable.SocketRow]] = {}
    for ino, handle in (netns.discover() if handles is None else handles).items():
        if only is not None and ino not in only:
            continue
        try:
            tables[ino] = socktable.read(handle, socktable.LISTENERS)
        except OSError:  # namespace vanished
            continue
    return from_tables(tables)


def from_tables(tables: dict[int, list[socktable.SocketRow]],
                sockopts: bool = False) -> dict[tuple[int, int], Listener]:
    """The listeners in each namespace's socket table (netns inode -> socktable.read()),
    named after their owners. With `sockopts`, each one's TCP_FASTOPEN queue length too."""
    found: dict[tuple[int, int], Listener] = {}
    for ino, rows in tables.items():
        for row in rows:
            if row.state == socktable.LISTEN:
                key = (ino, row.local_port)
                found.setdefault(key, Listener(*key)).inodes.add(row.inode)
    if not found:
        return found
    owners = socket_owners()
    for lst in found.values():
        for inode in lst.inodes:
            lst.fds |= owners.get(inode, set())
        lst.pids = {pid for pid, _ in lst.fds}
        lst.comms = {c for c in map(_comm, lst.pids) if c}
        if sockopts:
            lst.tfo_qlen = _first_readable(lst.fds)
    return found


def _first_readable(fds: set[tuple[int, int]]) -> int | None:
    for pid, fd in sorted(fds):
        qlen = tfo_queue_len(pid, fd)
        if qlen is not None:
            return qlen
    return None
