"""Boot one lab kernel under qemu (virtme-ng, TCG) and run the kprobe-tier tests inside.

    python tests/vm/lab.py RELEASE OUTDIR            the kprobe-tier tests
    python tests/vm/lab.py --bench RELEASE OUTDIR    bench/run.py in the guest (`make bench`)
    python tests/vm/lab.py --systemd RELEASE OUTDIR  the installed unit under a real systemd

One boot per kernel: inside, as root, it records `tfowatch facts` and `tfowatch probes
--json`, then runs GUEST_TESTS with JUnit XML. The host test (tests/lab/test_vm_lab.py)
asserts on what comes back; the console output is kept for when the guest fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
# The integration scenarios attach every kprobe for real; the event layout is checked as BCC
# compiles it for that kernel. (test_bpf_verify is left to the host: 5 more BCC compiles at
# ~1 min each under emulation would prove less than the attached run does.)
# The Prometheus e2e runs here too: only the kprobe tier fills every dashboard panel.
GUEST_TESTS = [f"tests/host/{name}" for name in (
    "test_integration.py", "test_top.py", "test_doctor.py", "test_prometheus_e2e.py",
    "test_event_layout.py::test_bcc_sees_the_same_struct", "test_least_privilege.py", "test_faults.py",
    "test_churn.py", "test_sockops.py::test_a_kernel_whose_sock_ops_cannot_name_the_task_says_so",
    "test_middlebox.py")]
# Tests marked host_only are left out: their subject (top's filters, doctor's survey, flags)
# does not depend on the tier, and each BCC compile they need costs minutes here (CI's run of
# all 43 did not end within 55 min).
# integration, top, doctor, Prometheus e2e, event layout, least privilege, faults, churn, sockops,
# middlebox (each behaviour on two of its four paths)
GUEST_TEST_COUNT = 11 + 5 + 1 + 3 + 1 + 6 + 2 + 4 + 1 + 10
# A whole guest run: ~29 min here (45+ min with a longer host phase beside it), two guests at once
# on single-threaded TCG beside the host tests (about 10 BCC compiles). A hung guest fails at
# this bound instead of eating CI's budget.
BOOT_TIMEOUT_S = 3300
GUEST_BPF_START_S = 900  # a BCC compile in the guest: ~1 min alone, several beside the other guest
SYSTEMD_TIMEOUT_S = 1200  # the systemd guest: ~1 min to boot, ~5 min of tests; more beside the others
ROOT_BUILD_TIMEOUT_S = 900  # mmdebstrap of the systemd root: ~2 min
OUT = ROOT / "tests" / "vm" / "out"


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
    return (f"cd {shlex.quote(str(ROOT))} && export PYTHONDONTWRITEBYTECODE=1 "
            f"TFOWATCH_BPF_START_S={GUEST_BPF_START_S} TFOWATCH_GUEST=1 && "
            f"{tfw} facts > {o}/facts.json 2> {o}/facts.err; "
            f"{tfw} probes --json > {o}/probes.json 2> {o}/probes.err; "
            f"{py} -m pytest -p no:cacheprovider -v -rs -m 'not host_only' --junitxml={o}/junit.xml {tests} "
            f"> {o}/pytest.txt 2>&1; echo $? > {o}/pytest.rc")


# Under TCG a connection costs ~30x what it does on the host: fewer, shorter repetitions and
# a fixed rate the guest can hold; scrape latency at 1k series only, 20 scrapes each way (10k
# series and 200 scrapes with the storm did not end within the guest's 55 min).
GUEST_BENCH_ARGS = ["--reps", "3", "--seconds", "5", "--rate", "200", "--soak", "0",  # the soak: on the host
                    "--series", "1000", "--scrapes", "20"]


def bench_script(release: str, out: Path) -> str:
    py = shlex.quote(str(VENV_BIN / "python"))
    o = shlex.quote(str(out))
    args = " ".join(shlex.quote(a) for a in [*GUEST_BENCH_ARGS, "--label",
                                               f"VM lab (kprobe tier, Debian {release}, qemu TCG)"])
    return (f"cd {shlex.quote(str(ROOT))} && export PYTHONDONTWRITEBYTECODE=1 && "
            f"{py} bench/run.py {args} --json {o}/bench.json > {o}/bench.txt 2>&1; "
            f"echo $? > {o}/bench.rc")


KILLED = "lab: killed at its time bound"
_running: set[subprocess.Popen[str]] = set()
_lock = threading.Lock()


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """`cmd` at a lower priority than the host tests it runs beside, in its own process group
    (killed whole on timeout or by stop()), with no standard input, as CI has none."""
    proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    with _lock:
        _running.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n{KILLED} after {timeout:.0f} s: {' '.join(cmd[:3])} ..."
    finally:
        with _lock:
            _running.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# qemu's default multi-threaded TCG runs a vCPU on stale code after the kernel has patched it
# (text_poke_bp: a static key flipped as a tracepoint or kprobe is attached or detached), so
# the guest dies of "Oops: int3" where real hardware never does: seen in test_faults[SIGKILL]
# on 6.12, and within seconds when tests/vm/poke_race.sh flips two tracepoints under loopback
# traffic with no tfowatch at all. Single-threaded TCG runs the same 2 vCPUs in turn on one
# host thread and survives it, so each guest costs one host core and two guests run at once.
TCG = "--qemu-opts=-accel tcg,thread=single"
GUEST = ["--disable-kvm", "--force-9p", "--cpus", "2", "--memory", "2G", "--verbose", TCG]


def vng_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def boot(release: str, out: Path, script: str = "") -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    # The script goes in a file: vng passes --exec on the kernel command line (base64), and
    # x86 keeps 2048 bytes of it. 6.12's fortified early boot dies of "kernel BUG at
    # lib/string_helpers.c:1040" on a longer one (seen with 34 guest tests and CI's paths).
    guest_sh = out / "guest.sh"
    guest_sh.write_text(script or guest_script(out))
    cmd = [str(VENV_BIN / "vng"), "--run", f"/boot/vmlinuz-{release}", *GUEST, "--rwdir", str(out),
           "--exec", f"sh {shlex.quote(str(guest_sh))}"]
    res = run(cmd, BOOT_TIMEOUT_S, vng_env())
    (out / "console.txt").write_text(res.stdout + res.stderr)
    return res


GUEST_BOOTS = 2  # a guest that ended on its own mid-run (a panic) boots once more, and says so


def kprobe_guest(release: str, out: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """Up to GUEST_BOOTS boots running GUEST_TESTS, while the guest ends mid-run (a kernel
    panic; vng exit 255). Returns the last boot and what each earlier console said."""
    said = ""
    for n in range(1, GUEST_BOOTS + 1):
        res = boot(release, out)
        if (out / "pytest.rc").exists() or KILLED in res.stderr or n == GUEST_BOOTS:
            if said:
                (out / "console-earlier-boots.txt").write_text(said)
            return res, said  # a guest over its bound fails as is
        console = (out / "console.txt").read_text(errors="replace")
        said += f"boot {n}: vng exit {res.returncode}; its console tail:\n{console[-2000:]}\n"
    raise AssertionError("unreachable")


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


# --- the installed unit under a real systemd ------------------------------------------------

SYSTEMD_RELEASE = "6.12.117+deb12-amd64"  # a lab kernel with kprobes, as in kernels.txt
LAB_ROOT = ROOT / "tests" / "vm" / "root"
GUEST_SRC = "/root/tfowatch-src"  # the checkout, as `make install` is run from it
GUEST_OUT = "/root/lab-out"
# The guest's one job: the in-guest test, its boot timing, then power off whatever happened.
LAB_UNIT = f"""[Unit]
Description=tfowatch VM lab: the installed unit under systemd
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
Environment=TFOWATCH_SYSTEMD_LAB=1 PYTHONDONTWRITEBYTECODE=1 TFOWATCH_BPF_START_S={GUEST_BPF_START_S}
WorkingDirectory={GUEST_SRC}
ExecStart=/bin/sh -c 'systemctl show -P ActiveEnterTimestampMonotonic multi-user.target \
  > {GUEST_OUT}/multi-user-usec.txt; \
  python3 -m pytest -p no:cacheprovider -v -rs -s --junitxml={GUEST_OUT}/junit.xml \
  tests/lab/test_systemd_unit.py > {GUEST_OUT}/pytest.txt 2>&1; echo $? > {GUEST_OUT}/pytest.rc; \
  journalctl -b --no-pager > {GUEST_OUT}/journal.txt'
TimeoutStartSec=40min

[Install]
WantedBy=multi-user.target
"""


def sh(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = run(list(cmd), timeout)
    if res.returncode != 0:
        tail = res.stdout[-2000:] + res.stderr[-3000:]
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}\n{tail}")
    return res


def copy_checkout(dest: Path) -> None:
    """The tracked files, as a user's clone has them."""
    # safe.directory: a user other than the checkout's owner (a unit run as nobody) may list it too
    names = sh("git", "-c", "safe.directory=*", "-C", str(ROOT), "ls-files", "-z").stdout.split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def pip_cert() -> str:
    """The CA file this machine's pip trusts for PyPI, if it names one (PIP_CERT, or pip's
    own config, as /etc/pip.conf sets it here): a chroot or an image build needs it too."""
    if cert := os.environ.get("PIP_CERT"):
        return cert
    # `pip config get` reads one file only; `list` is what pip itself merges.
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found = re.search(r"^(?:global|install)\.cert='([^']+)'$", res.stdout, re.MULTILINE)
    return found.group(1) if found else ""


def make_install_in(root: Path) -> str:
    """`make install` in the guest root, as documented, from a chroot (the guest has no
    network for pip). A private mount namespace holds /proc and /dev, gone when it ends."""
    env = ""
    if cert := pip_cert():
        shutil.copy(cert, root / "etc" / "ssl" / "lab-pip-ca.crt")
        env = "PIP_CERT=/etc/ssl/lab-pip-ca.crt "
    r = shlex.quote(str(root))
    script = (f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && "
              f"chroot {r} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root {env}"
              f"make -C {GUEST_SRC} install")
    return sh("unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script).stdout


def build_root(release: str) -> Path:
    base = LAB_ROOT / "base"
    sh(str(ROOT / "scripts" / "build-lab-root.sh"), str(base), release, timeout=ROOT_BUILD_TIMEOUT_S)
    return base


def prepare_systemd_root(release: str, base: Path) -> Path:
    """A fresh copy of the cached Debian root, with tfowatch installed and the lab unit."""
    run = LAB_ROOT / "run"
    if run.exists():
        shutil.rmtree(run)
    sh("cp", "-a", "--reflink=auto", str(base), str(run))
    copy_checkout(run / GUEST_SRC.lstrip("/"))
    (run / GUEST_OUT.lstrip("/")).mkdir(parents=True)
    # Debian kernels default to kernel.perf_event_paranoid=3; docs/DEPLOYMENT.md's fix.
    (run / "etc" / "sysctl.d" / "60-perf-event-paranoid.conf").write_text("kernel.perf_event_paranoid = 2\n")
    (run / GUEST_OUT.lstrip("/") / "install.txt").write_text(make_install_in(run))
    units = run / "etc" / "systemd" / "system"
    (units / "tfowatch-lab.service").write_text(LAB_UNIT)
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants" / "tfowatch-lab.service").symlink_to("../tfowatch-lab.service")
    return run


def systemd_boot(release: str, out: Path, base: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Boot `release` with systemd as PID 1 on the prepared root; its results land in `out`."""
    root = prepare_systemd_root(release, base or build_root(release))
    cmd = [str(VENV_BIN / "vng"), "--run", str(root / "boot" / f"vmlinuz-{release}"), "--root", str(root),
           "--rw", "--systemd", *GUEST]
    res = run(cmd, SYSTEMD_TIMEOUT_S, vng_env())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(root / GUEST_OUT.lstrip("/"), out)
    (out / "console.txt").write_text(res.stdout + res.stderr)
    return res


# --- the lab beside the host tests -----------------------------------------------------------
# The guests are mostly one BCC compile at a time under TCG and the host tests mostly wait on
# traffic and scrapes, so `make test` starts every selected boot when collection ends
# (tests/conftest.py), two at a time (each guest is one host thread, TCG above; three at once
# beside the host tests made four BCC compiles in one guest take over 430 s), and the VM tests
# collect their results. The systemd root is built meanwhile (mostly downloads and
# unpacking); its guest takes the first free place.
SYSTEMD_JOB = "systemd"
_guests = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vm-lab")
_builds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vm-root")
_jobs: dict[str, Future[Any]] = {}


def start(jobs: Iterable[str]) -> None:
    """Queue each job (a kernel release, or SYSTEMD_JOB) once, in the order given."""
    for job in jobs:
        if job in _jobs:
            continue
        if job == SYSTEMD_JOB:
            base = _builds.submit(build_root, SYSTEMD_RELEASE)
            _jobs[job] = _guests.submit(_systemd_job, base)
        else:
            _jobs[job] = _guests.submit(kprobe_guest, job, OUT / job)


def _systemd_job(base: Future[Path]) -> subprocess.CompletedProcess[str]:
    return systemd_boot(SYSTEMD_RELEASE, OUT / SYSTEMD_JOB, base.result())


def result(job: str) -> Any:
    start([job])
    return _jobs[job].result()


def stop() -> None:
    """Drop queued boots and kill running ones (the run ended or was interrupted)."""
    for future in _jobs.values():
        future.cancel()
    with _lock:
        for proc in _running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    if sys.argv[1] == "--bench":
        return bench(sys.argv[2], Path(sys.argv[3]))
    if sys.argv[1] == "--systemd":
        res = systemd_boot(sys.argv[2], Path(sys.argv[3]))
        rc_file = Path(sys.argv[3]) / "pytest.rc"
        rc = rc_file.read_text().strip() if rc_file.exists() else "none"
        print(f"vng exit {res.returncode}, guest pytest exit {rc}")
        return 0 if rc == "0" else 1
    release, out = sys.argv[1], Path(sys.argv[2])
    res, _ = kprobe_guest(release, out)
    rc = (out / "pytest.rc").read_text().strip() if (out / "pytest.rc").exists() else "none"
    print(f"{release}: vng exit {res.returncode}, guest pytest exit {rc}")
    return 0 if rc == "0" else 1


if __name__ == "__main__":
    sys.exit(main())
