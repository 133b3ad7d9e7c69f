"""cgroup v2 id (from bpf_get_current_cgroup_id) -> cgroup path, for client attribution.

On cgroup v2 the id is the inode of the cgroup's directory. A miss asks, in turn: the tree
under the v2 mount (walked at most once a second); what cgroup:cgroup_mkdir recorded in the
kernel as each cgroup was made (`made`, where the plan attaches it: it still knows a cgroup
removed before its counts were read; its paths are from the host's cgroup root, which is the
tree's root unless tfowatch runs in a cgroup namespace); and the process (/proc/PID/cgroup).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tfowatch.core import procfs

WALK_INTERVAL_S = 1.0


def cgroup2_mounts(mounts: str = "") -> list[Path]:
    try:
        with open(mounts or procfs.path("self", "mounts")) as f:
            return [Path(parts[1]) for parts in map(str.split, f) if len(parts) > 2 and parts[2] == "cgroup2"]
    except OSError:
        return []


def cgroup2_mount(mounts: str = "") -> Path | None:
    found = cgroup2_mounts(mounts)
    return found[0] if found else None


def is_root_cgroup(path: Path) -> bool:
    """The host's root cgroup has no cgroup.events (no cgroup but the root lacks it); the root
    of a cgroup namespace (a container's /sys/fs/cgroup) is some cgroup below it, and has one."""
    return path.is_dir() and not (path / "cgroup.events").exists()


def host_cgroup2_root(mounts: str = "") -> tuple[Path | None, str]:
    """The first cgroup v2 mount that shows the host's root cgroup, or None and why not."""
    found = cgroup2_mounts(mounts)
    for path in found:
        if is_root_cgroup(path):
            return path, ""
    if found:
        return None, (f"the cgroup v2 mount at {found[0]} is a cgroup namespace's, not the host's "
                      "root cgroup: a program there would see only that cgroup's sockets")
    return None, "no cgroup v2 mount"


def proc_cgroup(pid: int) -> str:
    """The v2 path of a live process, or '' once it has exited."""
    try:
        for line in procfs.path(pid, "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


class CgroupNames:
    def __init__(self, root: Path | None = None, max_entries: int = 65536,
                 made: Callable[[int], str] | None = None) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.max_entries = max_entries
        self.made = made  # id -> path recorded at mkdir, '' when unknown
        self._names: dict[int, str] = {}
        self._last_walk = -WALK_INTERVAL_S

    def _walk(self) -> None:
        if self.root is None:
            return
        names: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = os.path.relpath(dirpath, self.root)
            names[ino] = "/" if rel == "." else "/" + rel
            if len(names) >= self.max_entries:
                break
        self._names = names
        self._last_walk = time.monotonic()

    def name(self, cgroup_id: int, pid: int = 0) -> str:
        if not cgroup_id:
            return ""
        found = self._names.get(cgroup_id)
        if found is None and time.monotonic() - self._last_walk >= WALK_INTERVAL_S:
            self._walk()
            found = self._names.get(cgroup_id)
        if found is None and self.made is not None:  # gone already (or made since the walk)
            found = self.made(cgroup_id) or None
        if found is None and pid:
            # The cgroup is gone (or beyond the walk's bound): ask the process once and
            # remember, so later events of this id cost no /proc read.
            found = proc_cgroup(pid)
            if found and len(self._names) < self.max_entries:
                self._names[cgroup_id] = found
        return found or ""
