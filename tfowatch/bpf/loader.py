"""Compile tfowatch/bpf/tfowatch.bpf.c (package data) with BCC for this kernel and attach
what the plan says."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import importlib.resources
import logging
import os
import re
import select
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tfowatch.bpf.adopt import OPT_CB_FLAGS, PORT_MIXED, Unwatched, adopt_listeners
from tfowatch.core.blackhole import Blackhole
from tfowatch.core.btf import Btf, BtfError
from tfowatch.core.cgroups import host_cgroup2_root
from tfowatch.core.events import EV_TYPE_MAX, CountKey, CountVal, struct_of
from tfowatch.core.plan import PLAIN_BUILD, Attachment, Plan, Variant

log = logging.getLogger(__name__)

# The C sources are package data (pyproject.toml), found where the package is installed.
BPF_DIR = Path(str(importlib.resources.files("tfowatch") / "bpf"))
SOURCE = BPF_DIR / "tfowatch.bpf.c"
SOURCES = (SOURCE, BPF_DIR / "tfowatch.h")

BCC_MISSING = ("BCC's Python module is missing: install it with `apt install python3-bpfcc` and run "
               "tfowatch with /usr/bin/python3 or a venv made with --system-site-packages")

# macro -> (struct, member path); byte offsets
OFFSETS = {
    "OFF_SK_NET": ("sock", "__sk_common.skc_net.net"),
    "OFF_NET_INUM": ("net", "ns.inum"),
    "OFF_SK_NUM": ("sock_common", "skc_num"),
    "OFF_SKC_DPORT": ("sock_common", "skc_dport"),
    "OFF_SKC_DADDR": ("sock_common", "skc_daddr"),
    "OFF_SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
    "OFF_SKC_FAMILY": ("sock_common", "skc_family"),
    "OFF_TP_FASTOPEN_REQ": ("tcp_sock", "fastopen_req"),
    "OFF_TP_FOQ_QLEN": ("tcp_sock", "inet_conn.icsk_accept_queue.fastopenq.qlen"),
    "OFF_TP_FOQ_MAX_QLEN": ("tcp_sock", "inet_conn.icsk_accept_queue.fastopenq.max_qlen"),
    "OFF_FOC_LEN": ("tcp_fastopen_cookie", "len"),
    "OFF_SKB_CB": ("sk_buff", "cb"),
    "OFF_TCB_SEQ": ("tcp_skb_cb", "seq"),
    "OFF_TCB_END_SEQ": ("tcp_skb_cb", "end_seq"),
    "OFF_NET_TCP_FASTOPEN": ("net", "ipv4.sysctl_tcp_fastopen"),
    "OFF_NET_BLACKHOLE_TIMEOUT": ("net", "ipv4.sysctl_tcp_fastopen_blackhole_timeout"),
    "OFF_NET_TFO_DISABLE_TIMES": ("net", "ipv4.tfo_active_disable_times"),
    "OFF_NET_TFO_DISABLE_STAMP": ("net", "ipv4.tfo_active_disable_stamp"),
    "OFF_NET_TW_REUSE": ("net", "ipv4.sysctl_tcp_tw_reuse"),
    "OFF_TW_TS_RECENT_STAMP": ("tcp_timewait_sock", "tw_ts_recent_stamp"),
    "OFF_TP_FASTOPEN_RSK": ("tcp_sock", "fastopen_rsk"),
    "OFF_REQ_LISTENER": ("request_sock", "__req_common.skc_listener"),
    "OFF_REQ_NUM_RETRANS": ("request_sock", "num_retrans"),
    "OFF_TREQ_TFO_LISTENER": ("tcp_request_sock", "tfo_listener"),
    "OFF_TP_TS_RECENT_STAMP": ("tcp_sock", "rx_opt.ts_recent_stamp"),
    "OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FILE_PRIVATE": ("file", "private_data"),
    "OFF_SOCKET_SK": ("socket", "sk"),
    "OFF_ICSK_RETRANSMITS": ("tcp_sock", "inet_conn.icsk_retransmits"),
    "OFF_TP_OOO_QUEUE": ("tcp_sock", "out_of_order_queue"),
    "OFF_TP_DATA_SEGS_IN": ("tcp_sock", "data_segs_in"),
    "OFF_RB_LEFT": ("rb_node", "rb_left"),
    "OFF_RB_RIGHT": ("rb_node", "rb_right"),
    "OFF_SKB_RBNODE": ("sk_buff", "rbnode"),
    "OFF_TCB_TCP_FLAGS": ("tcp_skb_cb", "tcp_flags"),
}
OPTIONAL_OFFSETS = {
    "OFF_TW_ENTRY_STAMP": ("inet_timewait_sock", "tw_entry_stamp", "HAVE_TW_ENTRY_STAMP"),
    "OFF_NET_TW_REUSE_DELAY": ("net", "ipv4.sysctl_tcp_tw_reuse_delay", "HAVE_TW_ENTRY_STAMP"),
    "OFF_NET_COOKIE": ("net", "net_cookie", "HAVE_NET_COOKIE"),
    # x86-64's syscall argument registers, read at connect(2)'s exit (plan: CONNECT_AT_EXIT)
    "OFF_PT_REGS_DI": ("pt_regs", "di", "HAVE_SYSCALL_REGS"),
    "OFF_PT_REGS_SI": ("pt_regs", "si", "HAVE_SYSCALL_REGS"),
}
# TP_BIT(sk, NAME) -> tcp_sock bitfield
BITFIELDS = {
    "SYN_DATA": "syn_data",
    "SYN_FASTOPEN": "syn_fastopen",
    "SYN_DATA_ACKED": "syn_data_acked",
    "CLIENT_FAIL": "fastopen_client_fail",
    "FASTOPEN_CONNECT": "fastopen_connect",
    "SYN_FASTOPEN_CHILD": "syn_fastopen_child",
}
OPTIONAL_BITFIELDS = {"SYN_FASTOPEN_CHILD": "HAVE_SYN_FASTOPEN_CHILD",
                      "CLIENT_FAIL": "HAVE_CLIENT_FAIL"}

MAX_CONNS = 65536
MAX_LISTENERS = 16384  # sockops tier: (namespace, port)s whose listeners are flagged
MAX_COUNTS = 16384  # label sets counted in the kernel; beyond, events go out as samples
CGROUP_PATH_LEN = 256  # bytes of a cgroup's path kept from cgroup:cgroup_mkdir (longer: cut)
MAX_CGROUP_PATHS = 8192  # cgroups remembered (LRU): 2 MiB of kernel memory
COUNT_VAL = struct_of(CountVal)
# A CPU's perf buffer wakes the poller once per WAKEUP_EVENTS events instead of once per
# event; poll() then consumes whatever is there, so no event waits longer than one poll.
# With wakeup per event, the wakeups cost the traced (connecting) tasks more than the
# programs did (docs/PERFORMANCE.md, "perf buffer wakeups").
WAKEUP_EVENTS = 32


# Why a tier could not be loaded: the `reason` label of tfowatch_tier_degraded (a bounded set)
# and the fix the ERROR log line, `doctor` and the runbook name.
DEGRADED_FIX = {
    "bpf_sources_missing": "reinstall tfowatch: BPF sources missing from the package",
    "bcc_missing": "install python3-bpfcc and run tfowatch with a Python that sees it",
    "kernel_btf": "this kernel's BTF (/sys/kernel/btf/vmlinux) lacks a field tfowatch reads: "
                  "report the kernel release",
    "bpf_denied": "bpf() was denied: in a container the runtime's default seccomp profile may allow "
                  "it only with CAP_SYS_ADMIN (use seccompProfile Unconfined, docs/DEPLOYMENT.md); "
                  "else check the capabilities (CAP_BPF, CAP_PERFMON) and an LSM policy",
    "kallsyms_unreadable": "let tfowatch read /proc/kallsyms: systemd's ProtectKernelTunables=yes "
                           "hides it (the unit shipped with tfowatch does not set it)",
    "compile_failed": "BCC could not compile or load the programs: check the kernel headers "
                      "(/lib/modules/$(uname -r)/build) and run with -v for clang's messages",
    "attach_failed": "the kernel refused a probe: see `tfowatch probes`, and run with -v for "
                     "libbcc's messages",
    "no_cgroup2": "let tfowatch see the host's cgroup v2 root (the sockops tier attaches there): "
                  "systemd mounts it as /sys/fs/cgroup or /sys/fs/cgroup/unified; in a container, "
                  "mount the host's /sys/fs/cgroup (the DaemonSet does) or use the host's cgroup "
                  "namespace",
    "sockops_denied": "the sockops tier needs CAP_NET_ADMIN to load and attach its sock_ops "
                      "program: the unit and the DaemonSet shipped with tfowatch grant it",
    "sockops_helpers": "this kernel's sock_ops programs may not ask who the current task is "
                       "(6.1 refuses bpf_get_current_pid_tgid there, 6.12 bpf_get_current_comm; 6.18 "
                       "allows both), which the sockops tier needs to name each connecting process: "
                       "enable kprobes (the kprobe tier reads the task in a kprobe) or run a newer "
                       "kernel",
}


# How a verifier refuses a helper that names the current task to a sock_ops program: 6.1
# knows no bpf_get_current_pid_tgid there, 6.12 no bpf_get_current_comm.
TASK_HELPER_REFUSED = re.compile(r"(unknown func|cannot use helper) bpf_get_current_")


class LoadError(Exception):
    """BPF could not be compiled, loaded or attached; the message says why, `reason` is a
    key of DEGRADED_FIX."""

    def __init__(self, message: str, reason: str = "compile_failed", sockops: bool = False) -> None:
        assert reason in DEGRADED_FIX, reason
        super().__init__(message)
        self.reason = reason
        self.sockops = sockops  # the sock_ops program failed (the rest may load without it)

    @property
    def fix(self) -> str:
        return DEGRADED_FIX[self.reason]


def check_sources() -> None:
    """The C sources ship in the package; an install without them cannot load any tier."""
    missing = [str(p) for p in SOURCES if not p.is_file()]
    if missing:
        raise LoadError(f"BPF sources missing: {', '.join(missing)}", "bpf_sources_missing")


def offset_defines(btf: Btf) -> dict[str, int]:
    """Every offset and bit position the C code reads, from the running kernel's BTF."""
    out: dict[str, int] = {}
    try:
        for macro, (struct, path) in OFFSETS.items():
            out[macro] = btf.field(struct, path).offset
    except BtfError as exc:
        raise LoadError(f"kernel BTF lacks a field tfowatch needs: {exc}", "kernel_btf") from exc
    for macro, (struct, path, have_flag) in OPTIONAL_OFFSETS.items():
        present = btf.has_field(struct, path)
        out[macro] = btf.field(struct, path).offset if present else 0
        out[have_flag] = out.get(have_flag, 1) & int(present)
    for name, member in BITFIELDS.items():
        flag = OPTIONAL_BITFIELDS.get(name)
        have = btf.has_field("tcp_sock", member)
        if not have and flag is None:
            raise LoadError(f"kernel BTF: tcp_sock has no {member}", "kernel_btf")
        f = btf.field("tcp_sock", member) if have else None
        out[f"BIT_TP_{name}"] = f.bit_offset if f else 0
        out[f"NBITS_TP_{name}"] = (f.bit_size or f.size * 8) if f else 1
        if flag is not None:
            out[flag] = int(have)
    return out


def cflags(btf: Btf, plan: Plan, variant: Variant = PLAIN_BUILD) -> list[str]:
    defines = (offset_defines(btf) | plan.defines | variant.defines()
               | {"MAX_CONNS": MAX_CONNS, "MAX_COUNTS": MAX_COUNTS, "CGROUP_PATH_LEN": CGROUP_PATH_LEN,
                  "MAX_CGROUP_PATHS": MAX_CGROUP_PATHS, "MAX_LISTENERS": MAX_LISTENERS,
                  "OPT_CB_FLAGS": OPT_CB_FLAGS, "PORT_MIXED": PORT_MIXED})
    return [f"-I{BPF_DIR}", "-Wno-pointer-arith", "-Wno-unused-function",
            "-Wno-unused-variable", "-Wno-unused-parameter"] + \
        [f"-D{k}={v}" for k, v in sorted(defines.items())]


def import_bcc() -> Any:
    try:
        return importlib.import_module("bcc")
    except ImportError as exc:
        raise LoadError(BCC_MISSING, "bcc_missing") from exc


@contextlib.contextmanager
def libbcc_stderr() -> Iterator[list[str]]:
    """libbcc and clang write compiler warnings and perf_event_open() failures straight to
    fd 2; keep them out of the daemon's stderr (one line per error, and a quiet journal) and
    log them at debug level instead. Yields the list the lines are collected into."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]
            for line in lines:
                log.debug("libbcc: %s", line)


def read_counts(fd: int, keys: Any, vals: Any) -> list[tuple[bytes, int, int]]:
    """BPF_MAP_LOOKUP_BATCH over the whole `counts` hash into `keys` and `vals` (arrays of
    CountKey and CountVal as long as the map), parsed with struct."""
    lib = importlib.import_module("bcc.libbcc").lib
    capacity = len(keys)
    token, count, total = ctypes.c_uint32(0), ctypes.c_uint32(0), 0
    ksize, vsize = ctypes.sizeof(CountKey), ctypes.sizeof(CountVal)
    while total < capacity:
        count.value = capacity - total
        res = lib.bpf_lookup_batch(fd, ctypes.byref(token) if total else None, ctypes.byref(token),
                                   ctypes.byref(keys, ksize * total), ctypes.byref(vals, vsize * total),
                                   ctypes.byref(count))
        err = ctypes.get_errno()
        total += count.value
        if res != 0:
            if err != errno.ENOENT:  # ENOENT: the whole map has been read
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            break
        if count.value == 0:
            break
    kraw = ctypes.string_at(keys, ksize * total)
    vraw = ctypes.string_at(vals, vsize * total)
    return [(kraw[i * ksize:(i + 1) * ksize], n, pid)
            for i, (n, pid, _) in enumerate(COUNT_VAL.iter_unpack(vraw))]


def release_compiler_heap() -> None:
    """Clang/LLVM leave ~40 MB of freed heap that glibc keeps mapped; hand it back once the
    programs are loaded, so the daemon's steady RSS is what it uses (docs/PERFORMANCE.md)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class EventReader:
    """The `events` perf buffer of `bpf`, read by a poller thread and, on demand, by any other."""

    def __init__(self, bpf: Any, on_event: Callable[[int, Any, int], None],
                 on_lost: Callable[[int], None], pages: int, wakeup_events: int = WAKEUP_EVENTS) -> None:
        self.bpf = bpf
        bpf[b"events"].open_perf_buffer(on_event, page_cnt=pages, lost_cb=on_lost,
                                       wakeup_events=wakeup_events)
        self._consuming = threading.Lock()  # BCC's readers must not be read concurrently
        self._readable = select.poll()
        lib = importlib.import_module("bcc.libbcc").lib
        for reader in bpf.perf_buffers.values():
            self._readable.register(lib.perf_reader_fd(reader), select.POLLIN)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for a batch on any CPU, then read every buffer."""
        self._readable.poll(timeout_ms)
        self.consume()

    def consume(self) -> None:
        """Read every event in the buffers now, in the calling thread: a scrape gets all
        that was submitted before it without waiting for the poller."""
        with self._consuming:
            self.bpf.perf_buffer_consume()


BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type


def link_cgroup(prog_fd: int, cgroup: Path, attach_type: int) -> int:
    """A BPF link of a program to a cgroup: it sits beside any other program there (never
    replacing one) and goes when its fd does, so a daemon killed with SIGKILL leaves nothing
    attached. libbpf (Debian's libbpf1, which libbcc needs) makes it: BCC 0.26 has no link call."""
    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    libbpf.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = libbpf.bpf_link_create(prog_fd, fd, attach_type, None)
    finally:
        os.close(fd)
    if link < 0:
        raise OSError(-link, f"cannot link a program to {cgroup}: {os.strerror(-link)}")
    return int(link)


def attach_sock_ops(bpf: Any, fn_name: str) -> tuple[int, Path]:
    """The sock_ops program `fn_name` linked to the host's root cgroup, where it sees every
    TCP socket of the host; (the link's fd, the root)."""
    root, why = host_cgroup2_root()
    if root is None:
        raise LoadError(f"{why}: sock_ops attaches to the host's root cgroup", "no_cgroup2", True)
    try:
        fn = bpf.load_func(fn_name.encode(), bpf.SOCK_OPS)
    except Exception as exc:  # BCC raises bare Exception; EPERM without CAP_NET_ADMIN
        # BCC words EPERM as "Need super-user privileges"
        denied = ctypes.get_errno() == errno.EPERM or "privileges" in str(exc)
        raise LoadError(f"cannot load the sock_ops program: {exc}",
                        "sockops_denied" if denied else "attach_failed", True) from exc
    try:
        return link_cgroup(fn.fd, root, BPF_CGROUP_SOCK_OPS), root
    except OSError as exc:
        raise LoadError(f"cannot attach sock_ops: {exc.strerror}",
                        "sockops_denied" if exc.errno == errno.EPERM else "attach_failed", True) from exc


def say_adopted(adopted: int, unwatched: list[Unwatched]) -> None:
    if adopted:
        log.info("sockops: %d listening socket(s) open before start asked for their SYN-ACKs", adopted)
    if unwatched:
        log.warning("sockops: %d listener(s) open before start cannot be watched, so their cookie "
                    "requests, cookies and passive fallbacks are not seen (their TFO children are; "
                    "restarting them makes them watched): %s", len(unwatched),
                    "; ".join(map(str, unwatched[:10])) + (" ..." if len(unwatched) > 10 else ""))


class Probes:
    """The compiled programs, attached per plan, with their maps."""

    def __init__(self, plan: Plan, btf: Btf, variant: Variant = PLAIN_BUILD) -> None:
        check_sources()
        bcc = import_bcc()
        self.plan = plan
        self.variant = variant
        self.attached: dict[Attachment, bool] = {}
        self.reader: EventReader | None = None
        self._count_bufs: tuple[Any, Any] | None = None
        self._links: list[int] = []  # BPF link fds (sock_ops): closing one detaches it
        self._cgroup_root: Path | None = None  # sockops: where its program is linked
        # sockops: listeners open before it attached, asked for their SYN-ACKs; and those left unseen
        self.adopted = 0
        self.unwatched: list[Unwatched] = []
        try:
            with libbcc_stderr() as said:
                self.bpf = bcc.BPF(src_file=str(SOURCE).encode(), cflags=cflags(btf, plan, variant))
        except Exception as exc:  # BCC raises bare Exception on compile/load failure
            # BCC reports a denied bpf() as a failed compile; libbcc's own line says EPERM.
            denied = next((line.strip() for line in said if "Operation not permitted" in line), "")
            if denied:
                raise LoadError(f"BPF load failed: {denied}", "bpf_denied") from exc
            raise LoadError(f"BPF compile/load failed: {exc}") from exc

    def attach(self) -> None:
        """Attach every kprobe and the sock_ops program of the plan; tracepoints were bound at
        load by BCC."""
        for a in self.plan.attachments:
            if a.kind == "tracepoint":
                self.attached[a] = True
                continue
            said: list[str] = []
            try:
                with libbcc_stderr() as said:
                    if a.kind == "sockops":
                        link, self._cgroup_root = attach_sock_ops(self.bpf, a.fn)
                        self._links.append(link)
                    elif a.kind == "kprobe":
                        self.bpf.attach_kprobe(event=a.target, fn_name=a.fn)
                    else:
                        self.bpf.attach_kretprobe(event=a.target, fn_name=a.fn)
            except LoadError as exc:
                self.attached[a] = False
                self.close()
                refused = next((line for line in said if TASK_HELPER_REFUSED.search(line)), "")
                if refused:  # the verifier's own words
                    raise LoadError(f"{exc}: {refused.strip()}", "sockops_helpers", True) from exc
                raise
            except Exception as exc:
                self.attached[a] = False
                self.close()
                raise LoadError(f"cannot attach {a.kind} {a.target}: {exc}", "attach_failed") from exc
            self.attached[a] = True
        if self._cgroup_root is not None and self.plan.defines.get("SOCKOPS_PASSIVE"):
            # after the attach: a listen() from now on is seen
            with libbcc_stderr():
                self.adopted, self.unwatched = adopt_listeners(self.bpf, self._cgroup_root, link_cgroup)
            say_adopted(self.adopted, self.unwatched)  # outside libbcc_stderr(), which holds fd 2

    def open_events(self, on_event: Callable[[int, Any, int], None],
                    on_lost: Callable[[int], None], pages: int = 256,
                    wakeup_events: int = WAKEUP_EVENTS) -> None:
        self.reader = EventReader(self.bpf, on_event, on_lost, pages, wakeup_events)

    def poll(self, timeout_ms: int) -> None:
        if self.reader is not None:
            self.reader.poll(timeout_ms)

    def consume(self) -> None:
        if self.reader is not None:
            self.reader.consume()

    def counts(self) -> list[tuple[bytes, int, int]]:
        """(struct count_key bytes, count, last pid) of every label set counted in the kernel,
        read in batches (one system call per ~MAX_COUNTS entries, not two per entry)."""
        if not self.variant.in_kernel_counts:
            return []
        if self._count_bufs is None:  # allocated once: ~1 MB, reused by every scrape
            self._count_bufs = ((CountKey * MAX_COUNTS)(), (CountVal * MAX_COUNTS)())
        return read_counts(self.bpf[b"counts"].map_fd, *self._count_bufs)

    def take_counts(self, raws: list[bytes]) -> list[tuple[bytes, int, int]]:
        """Delete these label sets from the in-kernel counts, each with its last (count, pid)
        read in the same step (BPF_MAP_LOOKUP_AND_DELETE_ELEM), so an event the kernel counts
        meanwhile is not lost: it opens a new entry from 0."""
        lib = importlib.import_module("bcc.libbcc").lib
        lookup_and_delete = lib.bpf_lookup_and_delete
        lookup_and_delete.restype = ctypes.c_int
        lookup_and_delete.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        fd, val, out = self.bpf[b"counts"].map_fd, CountVal(), []
        for raw in raws:
            key = CountKey.from_buffer_copy(raw)
            if lookup_and_delete(fd, ctypes.addressof(key), ctypes.addressof(val)) == 0:
                out.append((raw, val.count, val.pid))
        return out

    def pending_outcomes(self) -> dict[int, int]:
        """netns -> client connections answered with SYN data, open, whose outcome is counted
        when they end (the tracked sockets flagged `pending`); {} where outcomes are counted
        at the SYN-ACK. One batch read of the tracked sockets."""
        if not self.plan.outcomes_at_close:
            return {}
        out: dict[int, int] = {}
        for _sk, conn in self.bpf[b"conns"].items_lookup_batch():
            if conn.pending:
                out[conn.netns] = out.get(conn.netns, 0) + 1
        return out

    def blackholes(self, current: Callable[[int], int | None]) -> dict[int, Blackhole]:
        """netns -> active TFO's blackhole state, where the programs have seen one disabled
        (since they started, or before, at a TFO attempt there). One read of a small map; the
        entry of a gone namespace whose inode a new one took (`current`: its cookie) goes."""
        out: dict[int, Blackhole] = {}
        table = self.bpf[b"blackholes"]
        for key, st in list(table.items()):
            now = current(key.netns)
            if now and key.netns_cookie and now != key.netns_cookie:
                with contextlib.suppress(KeyError):
                    del table[key]
                continue
            out[key.netns] = Blackhole(st.times, st.timeout_s, st.since_ns, st.until_ns)
        return out

    def cgroup_path(self, cgroup_id: int) -> str:
        """The path cgroup:cgroup_mkdir saw for this cgroup v2 id, or '' (made before the
        daemon started, forgotten, or no such tracepoint in this plan)."""
        if not self.plan.defines.get("CGROUP_NAMES"):
            return ""
        try:
            found = self.bpf[b"cgroup_paths"][ctypes.c_uint64(cgroup_id)]
        except KeyError:
            return ""
        return bytes(found.path).split(b"\0", 1)[0].decode(errors="replace")

    def totals(self) -> list[int]:
        """Exact per-type event counts kept in the kernel (summed over CPUs)."""
        table = self.bpf[b"totals"]
        out = [0] * EV_TYPE_MAX
        for i in range(EV_TYPE_MAX):
            out[i] = sum(table[ctypes.c_int(i)])
        return out

    def close(self) -> None:
        """Detach everything (BCC removes its kprobe_events entries)."""
        for link in self._links:
            with contextlib.suppress(OSError):
                os.close(link)
        self._links.clear()
        with contextlib.suppress(Exception):
            self.bpf.cleanup()
        for a in self.attached:
            self.attached[a] = False
