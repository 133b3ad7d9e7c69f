"""Boot one lab kernel under qemu (virtme-ng, TCG) and run the kprobe-tier tests inside.

    python tests/vm/lab.py RELEASE OUTDIR            the kprobe-tier tests
    python tests/vm/lab.py --bench RELEASE OUTDIR    bench/run.py in the guest (`make bench`)

One boot per kernel: inside, as root, it records `tfowatch facts` and `tfowatch probes
--json`, then runs GUEST_TESTS with JUnit XML. The host test (tests/test_vm_lab.py)
asserts on what comes back; the console output is kept for when the guest fails.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
# The integration scenarios attach every kprobe for real; the event layout is checked as BCC
# compiles it for that kernel. (test_bpf_verify is left to the host: 5 more BCC compiles at
# ~1 min each under emulation would prove less than the attached run does.)
# The Prometheus e2e runs here too: only the kprobe tier fills every dashboard panel.
GUEST_TESTS = ["tests/test_integration.py", "tests/test_top.py", "tests/test_doctor.py",
               "tests/test_prometheus_e2e.py", "tests/test_event_layout.py::test_bcc_sees_the_same_struct",
               "tests/test_least_privilege.py", "tests/test_faults.py"]
# integration, top, doctor, Prometheus e2e, event layout, least privilege, faults
GUEST_TEST_COUNT = 9 + 9 + 8 + 3 + 1 + 6 + 2
BOOT_TIMEOUT_S = 1800  # a whole guest run: ~10 BCC compiles at ~1 min each under TCG


def releases() -> list[str]:
    lines = (ROOT / "tests" / "vm" / "kernels.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def guest_script(out: Path) -> str:
    py = shlex.quote(str(VENV_BIN / "python"))
    tfw = shlex.quote(str(VENV_BIN / "tfowatch"))
    o = shlex.quote(str(out))
    # TFOWATCH_GUEST_TESTS: a developer's narrower selection (e.g. one test file), by hand only.
    chosen = os.environ.get("TFOWATCH_GUEST_TESTS", "").split() or GUEST_TESTS
    tests = " ".join(shlex.quote(t) for t in chosen)
    return (f"cd {shlex.quote(str(ROOT))} && export PYTHONDONTWRITEBYTECODE=1 && "
            f"{tfw} facts > {o}/facts.json 2> {o}/facts.err; "
            f"{tfw} probes --json > {o}/probes.json 2> {o}/probes.err; "
            f"{py} -m pytest -p no:cacheprovider -v -rs --junitxml={o}/junit.xml {tests} "
            f"> {o}/pytest.txt 2>&1; echo $? > {o}/pytest.rc")


# Under TCG a connection costs ~30x what it does on the host: fewer, shorter repetitions and
# a fixed rate the guest can hold.
GUEST_BENCH_ARGS = ["--reps", "3", "--seconds", "5", "--rate", "200"]


def bench_script(release: str, out: Path) -> str:
    py = shlex.quote(str(VENV_BIN / "python"))
    o = shlex.quote(str(out))
    args = " ".join(shlex.quote(a) for a in [*GUEST_BENCH_ARGS, "--label",
                                               f"VM lab (kprobe tier, Debian {release}, qemu TCG)"])
    return (f"cd {shlex.quote(str(ROOT))} && export PYTHONDONTWRITEBYTECODE=1 && "
            f"{py} bench/run.py {args} --json {o}/bench.json > {o}/bench.txt 2>&1; "
            f"echo $? > {o}/bench.rc")


def boot(release: str, out: Path, script: str = "") -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    cmd = [str(VENV_BIN / "vng"), "--run", f"/boot/vmlinuz-{release}", "--disable-kvm",
           "--force-9p", "--cpus", "2", "--memory", "2G", "--verbose", "--rwdir", str(out),
           "--exec", script or guest_script(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BOOT_TIMEOUT_S)
    (out / "console.txt").write_text(res.stdout + res.stderr)
    return res


def bench(release: str, out: Path) -> int:
    res = boot(release, out, bench_script(release, out))
    rc = (out / "bench.rc").read_text().strip() if (out / "bench.rc").exists() else "none"
    print(f"{release}: vng exit {res.returncode}, guest bench exit {rc}")
    if rc != "0":
        log = out / "bench.txt"
        print(log.read_text()[-3000:] if log.exists() else "", file=sys.stderr)
        return 1
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"vm-{release}.json").write_text((out / "bench.json").read_text())
    return 0


def main() -> int:
    if sys.argv[1] == "--bench":
        return bench(sys.argv[2], Path(sys.argv[3]))
    release, out = sys.argv[1], Path(sys.argv[2])
    res = boot(release, out)
    rc = (out / "pytest.rc").read_text().strip() if (out / "pytest.rc").exists() else "none"
    print(f"{release}: vng exit {res.returncode}, guest pytest exit {rc}")
    return 0 if rc == "0" else 1


if __name__ == "__main__":
    sys.exit(main())
