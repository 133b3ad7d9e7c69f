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


def pids() -> Iterator[int]:
    """The processes under ROOT (entries vanish as processes exit: callers expect OSError)."""
    with os.scandir(ROOT) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def pid_of(handle: str) -> int | None:
    """The process of a namespace handle ROOT/PID/ns/net, or None for /run/netns/NAME."""
    rel = Path(handle)
    if not rel.is_relative_to(ROOT):
        return None
    first = rel.relative_to(ROOT).parts[:1]
    return int(first[0]) if first and first[0].isdigit() else None
