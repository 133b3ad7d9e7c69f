"""cgroup v2 id (from bpf_get_current_cgroup_id) -> cgroup path, for client attribution.

On cgroup v2 the id is the inode of the cgroup's directory, so the tree under the
v2 mount is walked on a miss (at most once a second). A cgroup that is already
gone is looked up through the process instead (/proc/PID/cgroup, "0::" line).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tfowatch.core import procfs

WALK_INTERVAL_S = 1.0


def cgroup2_mount(mounts: str = "") -> Path | None:
    try:
        with open(mounts or procfs.path("self", "mounts")) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return Path(parts[1])
    except OSError:
        pass
    return None


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
    def __init__(self, root: Path | None = None, max_entries: int = 65536) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.max_entries = max_entries
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
        if found is None and pid:
            # The cgroup is gone (or beyond the walk's bound): ask the process once and
            # remember, so later events of this id cost no /proc read.
            found = proc_cgroup(pid)
            if found and len(self._names) < self.max_entries:
                self._names[cgroup_id] = found
        return found or ""
