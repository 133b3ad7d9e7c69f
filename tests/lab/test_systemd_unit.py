"""The unit that `make install` puts in place, under a real systemd (PID 1).

Runs inside the VM lab's systemd guest only (tests/lab/test_vm_lab.py boots a Debian root built
by scripts/build-lab-root.sh, with tfowatch installed by `make install`); elsewhere it skips.
In order: start → active and serving the planned tier with every probe attached, a TFO
exchange counted exactly; SIGKILL → systemd restarts it and it serves again; stop →
inactive, no kprobe_events entry and none of its BPF programs left; the exposure that
`systemd-analyze security` measures is the one docs/DEPLOYMENT.md states."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from netlab import Lab, scrape, series, tfo_exchange

ROOT = Path(__file__).parents[2]
UNIT = "tfowatch.service"
URL = "http://127.0.0.1:19135/metrics"  # the installed config's listen address
TFOWATCH = Path("/usr/local/bin/tfowatch")  # where `make install` links it
KPROBE_EVENTS = Path("/sys/kernel/tracing/kprobe_events")

if os.environ.get("TFOWATCH_SYSTEMD_LAB") != "1" or not Path("/run/systemd/system").is_dir():
    pytest.skip("runs in the VM lab's systemd guest (tests/lab/test_vm_lab.py boots it)",
                allow_module_level=True)


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def show(prop: str) -> str:
    return systemctl("show", "-P", prop, UNIT).stdout.strip()


def journal() -> str:
    return subprocess.run(["journalctl", "-u", UNIT, "-b", "--no-pager", "-o", "cat"],
                          capture_output=True, text=True).stdout


BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
BPF_PROG_TYPE_KPROBE = 2
SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_uint64]) -> int:
    return int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def progs() -> dict[int, int]:
    """Every loaded BPF program, id -> program type, from the kernel itself (bpf(2))."""
    out: dict[int, int] = {}
    attr = (ctypes.c_uint64 * 4)()
    ids = ctypes.cast(attr, ctypes.POINTER(ctypes.c_uint32))  # start_id, next_id
    while _bpf(BPF_PROG_GET_NEXT_ID, attr) == 0:
        prog_id = ids[1]
        attr[0], attr[1] = prog_id, 0  # start_id = this one; next_id, open_flags = 0
        fd_attr = (ctypes.c_uint64 * 2)(prog_id)
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, fd_attr)
        if fd < 0:
            continue  # freed meanwhile
        info = (ctypes.c_uint32 * 64)()  # struct bpf_prog_info starts with type
        info_attr = (ctypes.c_uint64 * 2)()
        info_attr[0] = fd | (ctypes.sizeof(info) << 32)  # bpf_fd, info_len
        info_attr[1] = ctypes.addressof(info)
        if _bpf(BPF_OBJ_GET_INFO_BY_FD, info_attr) == 0:
            out[prog_id] = info[0]
        os.close(fd)
    return out


def prog_ids() -> set[int]:
    return set(progs())


def serving(deadline_s: float = 420) -> None:
    """Active (running) and answering /metrics; BCC's compile takes ~1 min under TCG."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        state = (show("ActiveState"), show("SubState"))
        if state == ("active", "running"):
            try:
                urllib.request.urlopen(URL, timeout=5)
                return
            except OSError:
                pass
        elif state[0] == "failed":
            break
        time.sleep(1)
    pytest.fail(f"{UNIT} is {show('ActiveState')}/{show('SubState')}, not serving:\n{journal()[-3000:]}")


@pytest.fixture(scope="module")
def before_start() -> set[int]:
    return prog_ids()  # systemd's own cgroup programs, and nothing of ours


@pytest.fixture(scope="module")
def planned() -> dict[str, Any]:
    """The installed tfowatch's plan for this kernel (`tfowatch probes --json`)."""
    plan: dict[str, Any] = json.loads(subprocess.run(
        [str(TFOWATCH), "probes", "--json"], capture_output=True, text=True, check=True, cwd="/").stdout)
    return plan


def test_the_unit_sees_the_kernel_facts_that_root_sees() -> None:
    """`tfowatch facts` inside the unit's sandbox (a copy of the installed unit that runs it)
    equals `tfowatch facts` as plain root: no hardening line hides what the plan needs."""
    unit = Path("/run/systemd/system/tfowatch-facts.service")
    out = Path("/run/tfowatch-facts.json")
    text = re.sub(r"^ExecStart=.*$", f"ExecStart={TFOWATCH} facts", Path(f"/etc/systemd/system/{UNIT}")
                  .read_text(), flags=re.M).replace("Type=simple", "Type=oneshot")
    unit.write_text(text + f"\n[Service]\nRestart=no\nStandardOutput=file:{out}\n")
    try:
        systemctl("daemon-reload")
        res = systemctl("start", unit.name)
        assert res.returncode == 0, res.stderr
        in_unit = json.loads(out.read_text())
    finally:
        unit.unlink()
        systemctl("daemon-reload")
    as_root = json.loads(subprocess.run([str(TFOWATCH), "facts"], capture_output=True, text=True,
                                        check=True).stdout)
    differ = {k: (in_unit.get(k), v) for k, v in as_root.items() if in_unit.get(k) != v}
    assert not differ, differ


def test_start_serves_the_planned_tier_and_counts_exactly(before_start: set[int], planned: dict[str, Any],
                                                         lab: Lab) -> None:
    started = time.monotonic()
    res = systemctl("start", UNIT)
    assert res.returncode == 0, res.stderr + journal()[-3000:]
    serving()
    print(f"start to first scrape: {time.monotonic() - started:.0f} s")
    exchange = tfo_exchange(lab)
    samples = scrape(URL)
    (info,) = [dict(k) for k in series(samples, "tfowatch_build_info")]
    assert info["tier"] == info["planned_tier"] == planned["tier"] == "kprobe", info
    attached = series(samples, "tfowatch_probe_attached")
    want = {f"{a['kind']}:{a['target']}" for p in planned["points"] for a in p["attachments"]}
    assert {dict(k)["target"] for k in attached} == want and set(attached.values()) == {1.0}, attached
    exchange.assert_counted_exactly(samples)
    assert "tfowatch: ERROR" not in journal(), journal()


def test_sigkill_is_restarted_by_systemd() -> None:
    pid, restarts = show("MainPID"), int(show("NRestarts"))
    assert pid != "0"
    assert systemctl("kill", "-s", "SIGKILL", UNIT).returncode == 0
    deadline = time.monotonic() + 30
    while show("MainPID") in (pid, "0") and time.monotonic() < deadline:
        time.sleep(0.5)
    serving()
    assert show("MainPID") != pid and int(show("NRestarts")) == restarts + 1
    samples = scrape(URL)
    (info,) = [dict(k) for k in series(samples, "tfowatch_build_info")]
    attached = series(samples, "tfowatch_probe_attached")
    assert info["tier"] == "kprobe" and len(attached) > 4, (info, attached)  # the tracepoint tier has 4
    assert set(attached.values()) == {1.0}, attached


def test_stop_leaves_no_probe_behind(before_start: set[int], planned: dict[str, Any]) -> None:
    ours = prog_ids() - before_start
    assert ours, "no BPF program of tfowatch's was loaded"
    # Every kprobe program the plan names is loaded while it runs, one per function (BCC
    # attaches them through the kprobe PMU here, so they do not show in kprobe_events).
    functions = {a["fn"] for p in planned["points"] for a in p["attachments"]
                 if a["kind"] in ("kprobe", "kretprobe")}
    kinds = progs()
    loaded = sum(kinds.get(i) == BPF_PROG_TYPE_KPROBE for i in ours)
    assert len(functions) >= 5 and loaded >= len(functions), (functions, {i: kinds.get(i) for i in ours})
    assert systemctl("stop", UNIT).returncode == 0
    assert show("ActiveState") == "inactive", show("ActiveState")
    deadline = time.monotonic() + 10  # programs are freed after an RCU grace period
    while ours & prog_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ours & prog_ids(), f"BPF programs left: {sorted(ours & prog_ids())}"
    assert "bcc_" not in KPROBE_EVENTS.read_text(), KPROBE_EVENTS.read_text()


def test_measured_exposure_is_the_documented_one() -> None:
    """The loaded unit, rated by the running systemd; the lines where the offline rating of
    the same file differs are printed (docs/DEPLOYMENT.md gives both)."""
    def rate(*extra: str) -> tuple[str, set[str]]:
        out = subprocess.run(["systemd-analyze", "security", *extra, "--no-pager", UNIT],
                             capture_output=True, text=True).stdout
        m = re.search(r"Overall exposure level for tfowatch.service: (\d+\.\d \w+)", out)
        assert m, out[-1000:]
        return m.group(1), {line.strip() for line in out.splitlines() if line.strip()}

    (online, lines), (offline, off_lines) = rate(), rate("--offline=yes", "/etc/systemd/system/" + UNIT)
    print(f"systemd-analyze security, systemd {systemctl('--version').stdout.split()[1]}: loaded unit "
          f"{online}, offline {offline}; only online: {sorted(lines - off_lines)}; "
          f"only offline: {sorted(off_lines - lines)}")
    docs = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    assert f"rates the loaded unit **{online}**" in docs, online
