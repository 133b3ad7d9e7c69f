"""Kernel lab: the kprobe tier on Debian's stock 6.1 and 6.12 kernels, booted under qemu.

One boot per kernel (tests/vm/lab.py) runs the integration scenarios inside as root; this
host-side test asserts on the JUnit report, the probe plan and the facts it brings back.
A boot or guest failure fails here with the guest's console output attached. The boots start
when collection ends and run beside the host tests (tests/conftest.py); each test here waits
for its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "vm"))
import lab

OUT = lab.OUT
# Each boot is bounded in tests/vm/lab.py; a test here may wait for the boots queued before it.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(0)]


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(none)"


def guest_report(out: Path, res: subprocess.CompletedProcess[str]) -> tuple[dict[str, int], str]:
    """The guest's JUnit counts, and the context a failure shows (its pytest and console tails)."""
    context = (f"\n--- guest pytest ---\n{tail(out / 'pytest.txt')}"
               f"\n--- console ---\n{tail(out / 'console.txt')}")
    assert (out / "junit.xml").exists(), f"vng exit {res.returncode}, no report{context}"
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    return {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}, context


@pytest.mark.parametrize("release", lab.releases())
def test_kprobe_tier_on_lab_kernel(release: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("VM lab needs root (make test runs as root)")
    for need in (f"/boot/vmlinuz-{release}", f"/lib/modules/{release}/build"):
        assert Path(need).exists(), f"{need} missing: run scripts/setup-vm-lab.sh (make test does)"
    assert shutil.which("qemu-system-x86_64"), "qemu missing: run scripts/setup-vm-lab.sh"
    out = OUT / release
    res, retried = lab.result(release)
    if retried:  # the guest ended mid-run and was booted once more: said, and a second crash fails
        warnings.warn(f"{release}: guest ended without finishing; booted once more. {retried}", stacklevel=1)
    counts, context = guest_report(out, res)
    clean = counts["failures"] == counts["errors"] == counts["skipped"] == 0
    assert counts["tests"] >= lab.GUEST_TEST_COUNT and clean, f"{counts}{context}"
    plan = json.loads((out / "probes.json").read_text())
    assert plan["tier"] == "kprobe", context
    assert {"tfowatch_cookie_requests_total", "tfowatch_tw_reuse_total"} <= set(plan["metrics"])
    facts = json.loads((out / "facts.json").read_text())
    assert facts["release"] == release and facts["kprobes"] is True
    # The facts recorded from the image (tests/facts/) agree with the booted kernel's own.
    recorded = json.loads((Path(__file__).parents[1] / "facts" / f"{release}.json").read_text())
    assert recorded["present"] == facts["present"] and recorded["fields"] == facts["fields"]


SYSTEMD_GUEST_TESTS = 5  # tests/lab/test_systemd_unit.py


def test_systemd_unit_under_real_systemd() -> None:
    """`make install` into a Debian root built from Debian's packages, booted with systemd as
    PID 1 on a kprobe kernel; tests/lab/test_systemd_unit.py runs inside (start, SIGKILL restart,
    stop, exposure)."""
    if os.geteuid() != 0:
        pytest.skip("VM lab needs root (make test runs as root)")
    assert shutil.which("mmdebstrap"), "mmdebstrap missing: run scripts/setup-host.sh (make test does)"
    assert lab.SYSTEMD_RELEASE in lab.releases()
    out = OUT / lab.SYSTEMD_JOB
    res = lab.result(lab.SYSTEMD_JOB)
    counts, context = guest_report(out, res)
    assert counts == {"tests": SYSTEMD_GUEST_TESTS, "failures": 0, "errors": 0, "skipped": 0}, \
        f"{counts}{context}"
    boot_s = int((out / "multi-user-usec.txt").read_text()) / 1e6
    print(f"systemd guest: multi-user.target after {boot_s:.1f} s (TCG)")
