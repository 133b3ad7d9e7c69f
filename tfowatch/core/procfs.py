"""Every /proc path tfowatch reads is built here, under one root: TFOWATCH_PROCFS, default
/proc (as node_exporter's --path.procfs). Unit tests point it at a recorded tree, so the
socket-table, listener and TcpExt readers run on fixtures without root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(os.environ.get("TFOWATCH_PROCFS", "/proc"))


def path(*parts: object) -> Path:
    """ROOT/parts..., e.g. path(pid, "net", "tcp")."""
    return ROOT.joinpath(*(str(p) for p in parts))


def pid_file(pid: int, *parts: str) -> str:
    """ROOT/PID/parts..., built as a string, for what runs per process or per namespace at
    every scrape: a Path interns each part it parses (sys.intern), so every new PID grew the
    interpreter's table of interned strings (the soak's first RSS step) and cost a few µs more."""
    return "/".join((str(ROOT), str(pid), *parts))


def ns_handle(pid: int) -> str:
    """ROOT/PID/ns/net: a namespace's handle, as pid_of reads it back."""
    return pid_file(pid, "ns", "net")


def pids() -> Iterator[int]:
    """The processes under ROOT (entries vanish as processes exit: callers expect OSError)."""
    with os.scandir(ROOT) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def pid_of(handle: str) -> int | None:
    """The process of a namespace handle ROOT/PID/ns/net, or None for /run/netns/NAME (by
    string, as ns_handle builds it)."""
    root = f"{ROOT}/"
    first = handle[len(root):].split("/", 1)[0] if handle.startswith(root) else ""
    return int(first) if first.isdigit() else None
