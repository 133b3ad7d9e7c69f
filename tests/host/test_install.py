"""What a user installs is what is proven: the sdist and the wheel carry the BPF sources; the
wheel, installed into a fresh venv outside the checkout and run from `/`, reaches the tier
`tfowatch probes` plans with every planned probe attached, and counts a TFO exchange exactly.
The same install with its BPF sources removed degrades loudly (an ERROR naming the fix,
`tfowatch_probe_attached 0`, `tfowatch_tier_degraded 1`), and `--strict` refuses to run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netlab import (
    Lab,
    Samples,
    config_hz,
    free_port,
    planned_plan,
    scrape,
    series,
    skip_unless_root_bpf,
    start_daemon,
    tfo_exchange,
    unit_caps,
)
from support import one_line_error

sys.path.insert(0, str(Path(__file__).parents[1] / "vm"))
from lab import copy_checkout

ROOT = Path(__file__).parents[2]
SOURCES = ("tfowatch/bpf/tfowatch.bpf.c", "tfowatch/bpf/tfowatch.h")


def checkout_copy(dest: Path) -> Path:
    """The tracked files only, as a clean clone would have them (no venv, no build litter)."""
    copy_checkout(dest)
    return dest


@dataclass
class Dist:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    src = checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    pip = [str(ROOT / ".venv" / "bin" / "pip"), "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), str(src)], check=True, timeout=300)
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                    f"from setuptools import build_meta as b; b.build_sdist({str(out)!r})"],
                   cwd=src, check=True, timeout=300, capture_output=True)
    (wheel,) = out.glob("tfowatch-*.whl")
    (sdist,) = out.glob("tfowatch-*.tar.gz")
    return Dist(wheel, sdist)


def test_sdist_and_wheel_carry_the_bpf_sources(dist: Dist) -> None:
    in_wheel = set(zipfile.ZipFile(dist.wheel).namelist())
    assert set(SOURCES) <= in_wheel, sorted(in_wheel)
    with tarfile.open(dist.sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert set(SOURCES) <= in_sdist, sorted(in_sdist)
    # What the wheel carries is the checkout's source, byte for byte.
    for name in SOURCES:
        assert zipfile.ZipFile(dist.wheel).read(name) == (ROOT / name).read_bytes()


@dataclass
class Installed:
    venv: Path
    binary: Path
    package: Path  # site-packages/tfowatch
    size_mb: float


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    skip_unless_root_bpf("installed-wheel test")
    venv = tmp_path_factory.mktemp("venv") / "tfowatch"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(dist.wheel)], check=True, timeout=600,
                   cwd="/")
    (package,) = venv.glob("lib/python3*/site-packages/tfowatch")
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e6
    return Installed(venv, venv / "bin" / "tfowatch", package, round(size, 1))


def test_installed_package_is_not_the_checkout(installed: Installed) -> None:
    plan = planned_plan(installed.binary, "/tmp")
    assert plan["bpf_sources"] == {"dir": str(installed.package / "bpf"), "missing": []}
    assert not str(installed.package).startswith(str(ROOT))
    # every kernel of ours (6.1 and later) has SO_NETNS_COOKIE: a reused inode is told apart
    assert plan["netns_identity"] == "inode+cookie"
    print(f"installed venv: {installed.size_mb} MB (BCC and LLVM come from the distribution)")


def run_installed(installed: Installed, *flags: str) -> tuple[str, subprocess.Popen[str]]:
    listen = f"127.0.0.1:{free_port()}"
    return listen, start_daemon(listen, unit_caps("sys-admin.conf"), *flags, binary=installed.binary,
                                cwd=Path("/"))


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return proc.stderr.read() if proc.stderr else ""


def test_installed_wheel_runs_the_planned_tier_and_counts_exactly(installed: Installed, lab: Lab) -> None:
    planned = planned_plan(installed.binary, "/")["tier"]
    listen, proc = run_installed(installed)
    try:
        exchange = tfo_exchange(lab)
        samples = scrape(f"http://{listen}/metrics")
    finally:
        err = stop(proc)
    (info,) = [dict(lab_) for lab_ in series(samples, "tfowatch_build_info")]
    assert info["tier"] == info["planned_tier"] == planned != "counters", (info, err)
    attached = series(samples, "tfowatch_probe_attached")
    assert attached and all(v == 1 for v in attached.values()), attached
    assert set(series(samples, "tfowatch_tier_degraded").values()) == {0}
    assert "ERROR" not in err, err
    exchange.assert_counted_exactly(samples)


BLACKHOLE_PORT = 7711


def test_installed_wheel_reports_the_kernels_blackhole_state(installed: Installed) -> None:
    """The installed daemon reads active TFO's blackhole state from the kernel: SYN-ACKs eaten
    on the way until the kernel's detection disables active TFO in the client's namespace."""
    hz, _ = config_hz()
    lab = Lab()  # its own: the client's TFO stays disabled for the blackhole timeout
    try:
        route = lab.routed_server("b", "3")
        lab.start_server(route.server, str(BLACKHOLE_PORT))
        lab.client.sysctl("net.ipv4.tcp_fastopen_blackhole_timeout_sec", "60")
        listen, proc = run_installed(installed)
        try:
            route.middlebox(f"tcp sport {BLACKHOLE_PORT} tcp flags & (syn | ack) == syn | ack drop")
            [eaten] = lab.client.peer("client", route.v4, str(BLACKHOLE_PORT), "1", "--give-up-on-timeout")
            assert eaten["detected"], eaten
            samples = wait_for_series(f"http://{listen}/metrics", "tfowatch_active_tfo_disabled",
                                      netns=str(lab.client.inode))
        finally:
            err = stop(proc)
    finally:
        lab.close()
    assert "CONFIG_HZ unknown" not in err, err
    assert list(series(samples, "tfowatch_kernel_hz").values()) == [hz]
    state = {name: v for name in ("tfowatch_active_tfo_disabled", "tfowatch_active_tfo_disable_count",
                                  "tfowatch_active_tfo_reenable_seconds")
             for k, v in series(samples, name).items() if dict(k)["netns"] == str(lab.client.inode)}
    reenable = state.pop("tfowatch_active_tfo_reenable_seconds")
    assert 0 < reenable <= 60, reenable
    assert state == {"tfowatch_active_tfo_disabled": 1, "tfowatch_active_tfo_disable_count": 1}, state


def wait_for_series(url: str, name: str, **labels: str) -> Samples:
    """The samples once `name` has a series with these labels (15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(url)
        if any(set(labels.items()) <= k for k in series(samples, name)) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.fixture
def sources_removed(installed: Installed, tmp_path: Path) -> Iterator[None]:
    """The install as a package without its package data would leave it: the loader, but no
    BPF sources."""
    bpf = installed.package / "bpf"
    sources = [*bpf.glob("*.c"), *bpf.glob("*.h")]
    assert sources
    for src in sources:
        src.rename(tmp_path / src.name)
    try:
        yield
    finally:
        for src in sources:
            (tmp_path / src.name).rename(src)


@pytest.mark.usefixtures("sources_removed")
def test_missing_sources_degrade_loudly(installed: Installed) -> None:
    plan = planned_plan(installed.binary, "/")
    assert plan["bpf_sources"]["missing"]
    text = subprocess.run([str(installed.binary), "probes"], capture_output=True, text=True).stdout
    assert text.startswith("BPF SOURCES MISSING") and "reinstall tfowatch" in text
    listen, proc = run_installed(installed)
    try:
        samples = scrape(f"http://{listen}/metrics")
    finally:
        err = stop(proc)
    (info,) = [dict(lab_) for lab_ in series(samples, "tfowatch_build_info")]
    assert info["tier"] == "counters" and info["planned_tier"] == plan["tier"] != "counters", info
    degraded = series(samples, "tfowatch_tier_degraded")
    assert degraded == {frozenset({("planned_tier", str(plan["tier"])), ("tier", "counters"),
                                   ("reason", "bpf_sources_missing")}): 1.0}, degraded
    # Every probe of the plan is there, at 0: the TfowatchProbeDetached alert can see it.
    attached = series(samples, "tfowatch_probe_attached")
    planned_targets = {f"{a['kind']}:{a['target']}" for p in plan["points"]
                       for a in p["attachments"]}
    assert planned_targets and {dict(k)["target"] for k in attached} == planned_targets
    assert set(attached.values()) == {0.0}
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "reinstall tfowatch: BPF sources missing from the package" in errors[0], err


@pytest.mark.usefixtures("sources_removed")
@pytest.mark.parametrize("how", ["flag", "config"])
def test_strict_refuses_to_degrade(installed: Installed, tmp_path: Path, how: str) -> None:
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_text("strict = true\n")
    flags = ["--strict"] if how == "flag" else ["--config", str(cfg)]
    listen = f"127.0.0.1:{free_port()}"
    res = subprocess.run([str(installed.binary), "run", "--listen", listen, *flags], capture_output=True,
                         text=True, timeout=120, cwd="/")
    one_line_error(res, 1, "strict: ")
    assert "reinstall tfowatch: BPF sources missing from the package" in res.stderr


def test_pip_install_of_the_source_tree_carries_the_sources(tmp_path: Path) -> None:
    """`pip install .` (not from a wheel) into a fresh venv: the sources are where the package is."""
    if os.geteuid() != 0:
        pytest.skip("installs into a fresh venv with /usr/bin/python3; make test runs as root")
    src = checkout_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "."], cwd=src, check=True, timeout=600)
    shutil.rmtree(src)  # nothing may point back into the tree it was built from
    plan = planned_plan(venv / "bin" / "tfowatch", "/")
    assert plan["bpf_sources"]["missing"] == [], plan
    assert str(plan["bpf_sources"]["dir"]).startswith(str(venv))
