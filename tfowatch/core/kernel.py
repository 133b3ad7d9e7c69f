"""What the running kernel can do: the facts the probe plan is resolved from.

Facts can be recorded to JSON and loaded back, so the plan is unit-tested
against the recorded facts of kernels we do not run on (tests/facts/).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tfowatch.core import netns, procfs
from tfowatch.core.btf import VMLINUX_BTF, Btf, BtfError

TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Symbols the probe plan may attach to (design-card points and their substitutes).
SYMBOLS = (
    "tcp_fastopen_cookie_gen",
    "tcp_fastopen_check",
    "tcp_send_syn_data",
    "tcp_twsk_unique",
    "tcp_try_fastopen",
    "tcp_connect",
    "tcp_fastopen_cookie_check",
    "tcp_fastopen_active_disable",
    "tcp_fastopen_active_detect_blackhole",
    "tcp_fastopen_active_disable_ofo_check",
)
TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_destroy_sock", "tcp/tcp_retransmit_synack",
               "cgroup/cgroup_mkdir", "syscalls/sys_enter_connect", "syscalls/sys_exit_connect")

# BTF members whose presence changes what the programs read.
OPTIONAL_FIELDS = {
    "syn_fastopen_child": ("tcp_sock", "syn_fastopen_child"),
    "tw_entry_stamp": ("inet_timewait_sock", "tw_entry_stamp"),
    "tcp_tw_reuse_delay": ("net", "ipv4.sysctl_tcp_tw_reuse_delay"),
    "fastopen_client_fail": ("tcp_sock", "fastopen_client_fail"),
    "sock_ops_hdr_opt": ("bpf_sock_ops_kern", "remaining_opt_len"),  # 5.10: SYN-ACK callbacks
    "syscall_regs": ("pt_regs", "si"),  # x86-64: a syscall's arguments are readable at its exit
}

SYSCTLS = (
    "tcp_fastopen",
    "tcp_fastopen_blackhole_timeout_sec",
    "tcp_tw_reuse",
    "tcp_tw_reuse_delay",
    "tcp_timestamps",
    "tcp_max_tw_buckets",
    "ip_local_port_range",
)


@dataclass
class KernelFacts:
    release: str
    kprobes: bool  # kprobe_events present: kprobes can be created
    kprobes_why: str  # why not, when not
    btf: bool
    headers: bool  # BCC can find kernel headers to compile against
    symbols: dict[str, bool] = field(default_factory=dict)  # name -> traceable
    present: dict[str, bool] = field(default_factory=dict)  # name -> in kallsyms
    tracepoints: list[str] = field(default_factory=list)
    fields: dict[str, bool] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    hz: int = 0  # CONFIG_HZ (jiffies per second), 0 when unknown
    hz_source: str = ""  # where hz was read (HZ_SOURCES), "" when unknown
    kallsyms_error: str = ""  # why /proc/kallsyms could not be read (then `present` is unknown)
    tracefs_error: str = ""  # why no tracefs could be read (then `tracepoints` is unknown)

    @property
    def version(self) -> tuple[int, int]:
        m = re.match(r"(\d+)\.(\d+)", self.release)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def traceable(self, symbol: str) -> bool:
        return self.symbols.get(symbol, False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelFacts:
        return cls(**json.loads(text))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except PermissionError:  # tracefs is root's: a user's `probes` or `facts` says so, no traceback
        return False


def tracefs() -> Path | None:
    """The mounted tracefs, mounting it at /sys/kernel/tracing if needed."""
    for d in TRACEFS_DIRS:
        if _is_dir(d / "events"):
            return d
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS_DIRS[0])],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return TRACEFS_DIRS[0] if _is_dir(TRACEFS_DIRS[0] / "events") else None


def _kallsyms(names: tuple[str, ...]) -> tuple[dict[str, bool], str]:
    """Which of `names` are text symbols in /proc/kallsyms (module suffixes ignored), and
    why it could not be read, if it could not (e.g. systemd's ProtectKernelTunables)."""
    wanted = set(names)
    found: set[str] = set()
    try:
        with open(procfs.path("kallsyms")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tT" and parts[2] in wanted:
                    found.add(parts[2])
    except OSError as exc:
        return {n: False for n in names}, f"cannot read /proc/kallsyms: {exc.strerror}"
    return {n: n in found for n in names}, ""


def _filter_functions(tfs: Path | None) -> set[str] | None:
    """Functions ftrace can hook, or None when the kernel has no function tracer."""
    if tfs is None or not (tfs / "available_filter_functions").exists():
        return None
    out = set()
    try:
        with open(tfs / "available_filter_functions") as f:
            for line in f:
                if line.strip():
                    out.add(line.split()[0])
    except OSError:  # present but unreadable (e.g. no function tracer behind it)
        return None
    return out


def kernel_hz(config: str) -> int:
    """CONFIG_HZ of a kernel config's text (0 when it does not say)."""
    m = re.search(r"^CONFIG_HZ=(\d+)$", config, re.M)
    return int(m.group(1)) if m else 0


# Where CONFIG_HZ may be found, in order; a container often has none of the first two.
HZ_SOURCES = ("/proc/config.gz", "/boot/config-RELEASE", "/proc/timer_list")
HZ_VALUES = (100, 250, 300, 1000)  # the kernel's choices (kernel/Kconfig.hz)
HZ_FIX = ("mount the host's /boot read-only (its config-RELEASE), or unmask /proc/timer_list "
          "(container runtimes mask it)")


def _config_hz(release: str) -> tuple[int, str]:
    """CONFIG_HZ and where it was found: the running kernel's config (/proc/config.gz, or the
    distribution's /boot/config-RELEASE), else measured from the jiffies /proc/timer_list shows;
    (0, "") when none is readable."""
    try:
        hz = kernel_hz(gzip.decompress(procfs.path("config.gz").read_bytes()).decode(errors="replace"))
        if hz:
            return hz, HZ_SOURCES[0]
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    try:
        hz = kernel_hz((Path("/boot") / f"config-{release}").read_text(errors="replace"))
        if hz:
            return hz, HZ_SOURCES[1]
    except OSError:
        pass
    hz = measured_hz()
    return (hz, HZ_SOURCES[2]) if hz else (0, "")


def hz_unknown(facts: KernelFacts) -> str:
    """Why the blackhole state's times cannot be given ("" when they can)."""
    if facts.hz:
        return ""
    return ("CONFIG_HZ unknown (none of " + ", ".join(HZ_SOURCES) + " readable): active TFO's "
            "blackhole state has no times (tfowatch_kernel_hz 0; no tfowatch_active_tfo_disabled, "
            f"_reenable_seconds, _last_disable_timestamp_seconds); fix: {HZ_FIX}")

def _jiffies() -> tuple[int, int] | None:
    """(jiffies, CLOCK_MONOTONIC ns) from /proc/timer_list, or None where it is unreadable."""
    try:
        with open(procfs.path("timer_list")) as f:
            for line in f:
                if line.startswith("jiffies:"):
                    return int(line.split()[1]), time.monotonic_ns()
    except (OSError, ValueError, IndexError):
        pass
    return None


def measured_hz(window_s: float = 0.2) -> int:
    """CONFIG_HZ from the jiffies counted over `window_s`: the kernel's choice within 10 %
    of the rate seen, else 0."""
    first = _jiffies()
    if first is None:
        return 0
    time.sleep(window_s)
    second = _jiffies()
    if second is None or second[1] <= first[1]:
        return 0
    rate = (second[0] - first[0]) * 1e9 / (second[1] - first[1])
    near = min(HZ_VALUES, key=lambda hz: abs(hz - rate))
    return near if abs(near - rate) <= 0.1 * near else 0


def _headers_usable(release: str) -> bool:
    build = Path("/lib/modules") / release / "build"
    return (build / "include").is_dir() or (build / "Makefile").exists() or \
        Path("/sys/kernel/kheaders.tar.xz").exists()


def detect() -> KernelFacts:
    release = platform.release()
    tfs = tracefs()
    kprobe_events = tfs is not None and (tfs / "kprobe_events").exists()
    why = ""
    if tfs is None:
        why = ("tracefs is not mounted and could not be mounted" if os.geteuid() == 0
               else "tracefs is not readable by this user (tfowatch runs as root)")
    elif not kprobe_events:
        why = f"{tfs}/kprobe_events is absent (kernel built without CONFIG_KPROBES)"
    present, kallsyms_error = _kallsyms(SYMBOLS)
    ftrace = _filter_functions(tfs)
    # Without the function tracer, kprobes still attach to any non-blacklisted text symbol.
    traceable = {n: present[n] and kprobe_events and (ftrace is None or n in ftrace)
                 for n in SYMBOLS}
    tps = [tp for tp in TRACEPOINTS if tfs is not None and (tfs / "events" / tp / "format").exists()]
    fields: dict[str, bool] = {}
    btf_ok = VMLINUX_BTF.exists()
    if btf_ok:
        try:
            btf = Btf.load()
            fields = {k: btf.has_field(*v) for k, v in OPTIONAL_FIELDS.items()}
        except BtfError:
            btf_ok = False
    hz, hz_source = _config_hz(release)
    return KernelFacts(
        release=release, hz=hz, hz_source=hz_source, kprobes=kprobe_events, kprobes_why=why, btf=btf_ok,
        headers=_headers_usable(release), symbols=traceable, present=present,
        kallsyms_error=kallsyms_error, tracefs_error=why if tfs is None else "",
        tracepoints=tps, fields=fields, sysctls=netns.read_ipv4_sysctls(SYSCTLS),
    )


CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 21, 38, 39


def effective_caps() -> int:
    try:
        m = re.search(r"^CapEff:\s*([0-9a-f]+)", procfs.path("self", "status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1), 16) if m else 0


def has_cap(cap: int) -> bool:
    return bool(effective_caps() & (1 << cap))


def missing_bpf_caps() -> list[str]:
    """The capabilities BPF tracing needs that this process lacks ([] when it may load):
    CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN before 5.8. Asked of the kernel, not of the
    uid: root in a capability-bounded unit may lack them."""
    if has_cap(CAP_SYS_ADMIN):
        return []
    return [name for cap, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not has_cap(cap)]


def perf_event_paranoid() -> int:
    try:
        return int(procfs.path("sys", "kernel", "perf_event_paranoid").read_text())
    except (OSError, ValueError):
        return 2


def perf_events_denied() -> str:
    """Why perf_event_open() will be refused to this process, or '' if nothing says so.
    Debian and Ubuntu kernels add a level 3 (their default) at which only CAP_SYS_ADMIN may
    open perf events: CAP_PERFMON, enough upstream, is not."""
    level = perf_event_paranoid()
    if level < 3 or has_cap(CAP_SYS_ADMIN):
        return ""
    return (f"kernel.perf_event_paranoid is {level}: this kernel lets only CAP_SYS_ADMIN attach "
            "probes; set it to 2 (sysctl -w kernel.perf_event_paranoid=2) or grant CAP_SYS_ADMIN "
            "(deploy/systemd/dropins/sys-admin.conf)")


def namespace_blind_spots() -> list[str]:
    """What this process cannot see for want of a capability (empty when it sees everything)."""
    out = []
    if not has_cap(CAP_SYS_PTRACE):
        out.append("no CAP_SYS_PTRACE: only namespaces of processes this one may ptrace are found")
    if not has_cap(CAP_SYS_ADMIN):
        out.append("no CAP_SYS_ADMIN: namespaces no process is in (`ip netns add`) cannot be read; "
                   "they are counted in tfowatch_netns_unreadable")
    return out
