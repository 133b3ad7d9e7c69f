"""Listeners opened before the sockops tier attached: they never pass TCP_LISTEN_CB, so their
SYN-ACKs (cookie requests, cookies, passive fallbacks) would go unseen. Each one is adopted
through tfowatch's own setsockopt(SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) on a duplicate of a
holder's fd, which the cgroup setsockopt program on_adopt (tfowatch.bpf.c) turns into the
listener's SYN-ACK flag. The program sits on tfowatch's own cgroup only while this runs.

A listener that cannot be adopted (a kernel before 6.12, no process holding it, no ptrace
access) is returned as unwatched: the daemon says so, in a log line and in
tfowatch_listeners_unwatched.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfowatch.core.cgroups import proc_cgroup
from tfowatch.doctor import listeners

log = logging.getLogger(__name__)

# Passed to tfowatch.bpf.c as defines (loader.cflags): these are the only definitions.
OPT_CB_FLAGS = 1008  # TCP_BPF_SOCK_OPS_CB_FLAGS (6.12): BPF's own, refused to userspace
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25  # enum bpf_prog_type (BCC's BPF class does not name it)
BPF_CGROUP_SETSOCKOPT = 22  # enum bpf_attach_type
ADOPTED, REFUSED, UNSEEN = "adopted", "refused", "unseen"
PORT_MIXED = 2  # synack_ports: a port whose children are looked up per namespace


@dataclass(frozen=True)
class Unwatched:
    netns: int
    port: int
    comms: tuple[str, ...]
    why: str

    def __str__(self) -> str:
        return f"netns {self.netns} port {self.port} ({', '.join(self.comms) or 'no process'}): {self.why}"


def ask(sock: socket.socket) -> str:
    """The adoption call on one duplicate: ADOPTED; REFUSED (on_adopt said no: before 6.12,
    or not a listener); UNSEEN (on_adopt did not run)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, OPT_CB_FLAGS, 0)
    except OSError as exc:
        return REFUSED if exc.errno == errno.EPERM else UNSEEN
    return ADOPTED


def own_cgroup(root: Path) -> Path | None:
    """tfowatch's own cgroup under the host's v2 root ('/' in a cgroup namespace of its own:
    then the root, where on_adopt still acts on tfowatch's calls only)."""
    path = root / proc_cgroup(os.getpid()).lstrip("/")
    return path if path.is_dir() else None


def adopt_listeners(bpf: Any, root: Path, link: Any) -> tuple[int, list[Unwatched]]:
    """Adopt every listener open now; (adopted sockets, the listeners left unwatched).
    `link(prog_fd, cgroup_dir, attach_type)` returns a BPF link fd."""
    try:
        found = listeners.discover()
    except OSError as exc:
        log.warning("sockops: cannot list the listeners open now: %s", exc)
        mark_unknown(bpf, range(1, 65536))  # any of them may carry another program's flag
        return 0, []
    if not found:
        return 0, []
    try:
        fn = bpf.load_func(b"on_adopt", BPF_PROG_TYPE_CGROUP_SOCKOPT, attach_type=BPF_CGROUP_SETSOCKOPT)
        bpf[b"adopter"][ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
        cgroup = own_cgroup(root)
        if cgroup is None:
            raise OSError(f"tfowatch's cgroup {proc_cgroup(os.getpid())!r} is not under {root}")
        fd = link(fn.fd, cgroup, BPF_CGROUP_SETSOCKOPT)
    except Exception as exc:  # BCC raises bare Exception; the tier still runs without it
        why = f"cannot adopt listeners: {exc}"
        unwatched = [Unwatched(lst.netns, lst.port, tuple(sorted(lst.comms)), why) for lst in found.values()]
        mark_unknown(bpf, {u.port for u in unwatched})
        return 0, unwatched
    try:
        adopted, unwatched = _adopt_all(found)
    finally:
        os.close(fd)
    mark_unknown(bpf, {u.port for u in unwatched})
    return adopted, unwatched


def mark_unknown(bpf: Any, ports: Any) -> None:
    """Ports with a listener whose SYN-ACK flag tfowatch did not see set (not adopted): their
    children are looked up per namespace before a flag is cleared (synack_ports in
    tfowatch.bpf.c), so another program's flag is never taken off."""
    table = bpf[b"synack_ports"]
    for port in ports:
        table[ctypes.c_int(port)] = ctypes.c_uint8(PORT_MIXED)


def _adopt_all(found: dict[tuple[int, int], listeners.Listener]) -> tuple[int, list[Unwatched]]:
    adopted, unwatched = 0, []
    for lst in found.values():
        done: set[int] = set()
        outcome = "no process holds it (or no ptrace access to one that does)"
        for pid, fd in sorted(lst.fds):
            with listeners.duplicate(pid, fd) as sock:
                inode = os.fstat(sock.fileno()).st_ino if sock is not None else 0
                if sock is None or inode in done:
                    continue
                result = ask(sock)
                if result == ADOPTED:
                    done.add(inode)
                else:
                    outcome = ("this kernel cannot set sock_ops flags from BPF (Linux 6.12)"
                               if result == REFUSED else "the adoption program did not run")
        adopted += len(done)
        if lst.inodes - done:
            unwatched.append(Unwatched(lst.netns, lst.port, tuple(sorted(lst.comms)), outcome))
    return adopted, unwatched
