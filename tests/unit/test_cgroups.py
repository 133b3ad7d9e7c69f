"""Finding the host's root cgroup, where the sockops tier links its program: a container's
cgroup namespace shows some cgroup below it as its /sys/fs/cgroup, which must not be taken
for the root (a program there sees that cgroup's sockets only)."""

from __future__ import annotations

from pathlib import Path

from tfowatch.core.cgroups import host_cgroup2_root


def mounts(tmp_path: Path, *points: Path) -> str:
    f = tmp_path / "mounts"
    f.write_text("".join(f"cgroup2 {p} cgroup2 rw,nosuid 0 0\n" for p in points) +
                 "proc /proc proc rw 0 0\n")
    return str(f)


def cgroup(path: Path, root: bool) -> Path:
    path.mkdir(parents=True)
    (path / "cgroup.procs").write_text("")
    if not root:  # every cgroup but the root has cgroup.events (CFTYPE_NOT_ON_ROOT)
        (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return path


def test_the_mount_showing_the_root_is_chosen(tmp_path: Path) -> None:
    ns_root = cgroup(tmp_path / "container", root=False)
    host = cgroup(tmp_path / "host", root=True)
    assert host_cgroup2_root(mounts(tmp_path, ns_root, host)) == (host, "")


def test_only_a_namespaces_cgroup_is_refused_with_the_reason(tmp_path: Path) -> None:
    ns_root = cgroup(tmp_path / "container", root=False)
    path, why = host_cgroup2_root(mounts(tmp_path, ns_root))
    assert path is None and "cgroup namespace's, not the host's root cgroup" in why


def test_no_cgroup2_at_all(tmp_path: Path) -> None:
    assert host_cgroup2_root(mounts(tmp_path)) == (None, "no cgroup v2 mount")

