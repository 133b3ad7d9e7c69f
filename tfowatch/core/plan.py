"""Resolve the design card's probe points to what this kernel allows.

Pure: takes KernelFacts and a mode, returns a Plan. The loader attaches what the
plan says; `tfowatch probes` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tfowatch.core.events import DETECT, EVENTS, RECONCILIATIONS, events_of
from tfowatch.core.events import EventType as E
from tfowatch.core.kernel import KernelFacts
from tfowatch.core.metrics import TIERS, Metric

MODES = ("auto", *TIERS)

SET_STATE = "sock:inet_sock_set_state"
DESTROY = "tcp:tcp_destroy_sock"
CGROUP_MKDIR = "cgroup:cgroup_mkdir"
CONNECT_SYSCALL = ("syscalls:sys_enter_connect", "syscalls:sys_exit_connect")
REQUIRED_TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_destroy_sock")


class PlanError(Exception):
    """The requested mode cannot run on this kernel."""


@dataclass(frozen=True)
class Attachment:
    kind: str  # kprobe | kretprobe | tracepoint
    target: str  # kernel symbol, or "category:name"
    fn: str = ""  # BPF function (kprobes); tracepoints are bound by BCC itself


@dataclass
class Resolution:
    point: str
    tier: str
    attachments: list[Attachment]
    substitute: bool
    why: str
    events: list[E]
    counter: str = ""  # TcpExt counter that still carries the totals
    missing: tuple[Attachment, ...] = ()  # what this tier would attach, absent from this kernel


@dataclass(frozen=True)
class Degraded:
    """The planned tier could not be loaded (auto mode), so a lower one runs."""
    planned: Plan  # what `tfowatch probes` plans for this mode
    reason: str  # bounded code (bpfprog.DEGRADED_FIX): the metric's `reason` label
    detail: str  # the error, for logs and doctor
    fix: str

    def describe(self, tier: str) -> str:
        if tier == self.planned.tier:  # the kprobe tier without its sock_ops client side
            return (f"sock_ops unavailable ({self.detail}): {self.fix}; running the {tier} tier "
                    "with kprobes and tracepoints for the client side, which count a TFO "
                    "connection's outcome when it ends")
        return (f"{self.planned.tier} tier unavailable ({self.detail}): {self.fix}; "
                f"running the {tier} tier")


@dataclass(frozen=True)
class Variant:
    """How the programs are built, beside what the plan resolved for the kernel (a command's
    choice, passed to the loader, never written into a Plan)."""
    plain_connects: bool = False  # `doctor --watch`: report connects without TFO too
    in_kernel_counts: bool = False  # `run`: count per label set in a map, not a sample per event
    profile_ops: bool = False  # bench/callbacks.py: time each sock_ops callback (never shipped)

    def defines(self) -> dict[str, int]:
        return {"PLAIN_CONNECTS": int(self.plain_connects), "IN_KERNEL_COUNTS": int(self.in_kernel_counts),
                "PROFILE_OPS": int(self.profile_ops)}


PLAIN_BUILD = Variant()  # `top`'s: one perf sample per event, TFO connects only


@dataclass
class Plan:
    mode: str
    tier: str
    points: list[Resolution]
    defines: dict[str, int] = field(default_factory=dict)
    degraded: Degraded | None = None  # set when this plan runs instead of the planned one
    events: set[E] = field(default_factory=set)

    @property
    def planned_tier(self) -> str:
        return self.degraded.planned.tier if self.degraded else self.tier

    @property
    def attachments(self) -> list[Attachment]:
        seen: list[Attachment] = []
        for r in self.points:
            seen.extend(a for a in r.attachments if a not in seen)
        return seen

    @property
    def metrics(self) -> list[Metric]:
        """The probe families this plan's events feed, in the event table's order."""
        out: list[Metric] = []
        for spec in EVENTS:
            if spec.type in self.events:
                out.extend(m for m in spec.metrics if m not in out)
        return out

    @property
    def outcomes_at_close(self) -> bool:
        """Whether a client's acked/not-acked is counted when the connection ends (kprobes and
        tracepoints), not at its SYN-ACK (sock_ops): open ones are then pending."""
        return any(r.point == "tcp_send_syn_data" and r.attachments and SOCK_OPS not in r.attachments
                   for r in self.points)

    @property
    def reconciled(self) -> list[str]:
        return [r.label for r in RECONCILIATIONS if set(r.required) <= self.events]

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode, "tier": self.tier,
            "points": [dict(asdict(r), events=[e.name.lower() for e in r.events]) for r in self.points],
            "metrics": [m.name for m in self.metrics],
            "reconciled": self.reconciled,
        }

    def attachment_states(self, attached: Callable[[Attachment], bool]) -> list[tuple[str, str, str, bool]]:
        """(point, kind:target, tier, attached) for every attachment of this plan, each one its
        tier would use that this kernel lacks, then each one the planned plan had that this one
        lacks, as not attached: a daemon exports the probes it is missing as 0, not as absent
        series."""
        out = [(r.point, f"{a.kind}:{a.target}", r.tier, attached(a))
               for r in self.points for a in r.attachments]
        out += [(r.point, f"{a.kind}:{a.target}", self.tier, False) for r in self.points for a in r.missing]
        have = {(point, target) for point, target, _, _ in out}
        if self.degraded is not None:
            out += [(r.point, f"{a.kind}:{a.target}", r.tier, False)
                    for r in self.degraded.planned.points for a in r.attachments
                    if (r.point, f"{a.kind}:{a.target}") not in have]
        return out


# The sockops tier's one program, on the cgroup v2 root (a BPF link): every TFO point of both sides.
SOCK_OPS = Attachment("sockops", "cgroup2_root", "on_sock_ops")
# The kprobe on the kernel's blackhole detection: a point of its own, and half of the disables'.
DETECT_PROBE = Attachment("kprobe", DETECT, "on_detect_blackhole")


def _probe_pair(symbol: str, fn: str) -> list[Attachment]:
    return [Attachment("kprobe", symbol, fn), Attachment("kretprobe", symbol, fn + "_ret")]


def _bcc_ok(facts: KernelFacts) -> str:
    if not facts.btf:
        return "no kernel BTF (/sys/kernel/btf/vmlinux): field offsets cannot be resolved"
    if not facts.headers:
        return "no kernel headers for BCC (/lib/modules/$(uname -r)/build)"
    return ""


def _tracepoint_ok(facts: KernelFacts) -> str:
    if facts.tracefs_error:
        return facts.tracefs_error
    missing = [tp for tp in REQUIRED_TRACEPOINTS if tp not in facts.tracepoints]
    if missing:
        return "tracepoint(s) missing: " + ", ".join(missing)
    return _bcc_ok(facts)


def _sockops_ok(facts: KernelFacts) -> str:
    if not facts.fields.get("sock_ops_hdr_opt"):
        return "this kernel has no sock_ops header-option callbacks (Linux 5.10)"
    return _bcc_ok(facts)


def choose_tier(facts: KernelFacts, mode: str) -> str:
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "counters":
        return "counters"
    tp_problem = _tracepoint_ok(facts)
    if mode == "kprobe":
        if not facts.kprobes:
            raise PlanError(f"--mode kprobe: kprobes unavailable: {facts.kprobes_why}")
        if tp_problem:
            raise PlanError(f"--mode kprobe: {tp_problem}")
        return "kprobe"
    if mode == "tracepoint":
        if tp_problem:
            raise PlanError(f"--mode tracepoint: {tp_problem}")
        return "tracepoint"
    sockops_problem = _sockops_ok(facts)
    if mode == "sockops":
        if sockops_problem:
            raise PlanError(f"--mode sockops: {sockops_problem}")
        return "sockops"
    # auto: the most complete tier this kernel allows. Without kprobes, sock_ops sees every
    # TFO point the tracepoints see, and the server side's cookies and fallbacks too.
    if facts.kprobes and not tp_problem:
        return "kprobe"
    if not sockops_problem:
        return "sockops"
    return "counters" if tp_problem else "tracepoint"


def _passive(facts: KernelFacts, tier: str) -> tuple[Resolution, Resolution]:
    """tcp_fastopen_cookie_gen and tcp_fastopen_check: both live on in tcp_try_fastopen."""
    gen_absent = "not in kallsyms (static, inlined since 3.16)"
    if facts.present.get("tcp_fastopen_cookie_gen"):
        gen_absent = "present, but sees only the cookies generated for requests"
    check_absent = "removed in 3.16 (merged into tcp_try_fastopen)"
    if tier == "kprobe" and facts.traceable("tcp_try_fastopen"):
        att = _probe_pair("tcp_try_fastopen", "on_try_fastopen")
        why = "; tcp_try_fastopen entry (foc->len: request/cookie) + return (child, cookie sent) sees it all"
        return (Resolution("tcp_fastopen_cookie_gen", "kprobe", att, True, gen_absent + why,
                           events_of("tcp_fastopen_cookie_gen")),
                Resolution("tcp_fastopen_check", "kprobe", att, True, check_absent + why,
                           events_of("tcp_fastopen_check")))
    if tier == "sockops":
        return (Resolution("tcp_fastopen_cookie_gen", "sockops", [SOCK_OPS], True, gen_absent +
                           "; sock_ops: each SYN-ACK of a listener opened since start reads the "
                           "SYN's TFO option and what the kernel decided",
                           events_of("tcp_fastopen_cookie_gen")),
                Resolution("tcp_fastopen_check", "sockops", [SOCK_OPS], True, check_absent +
                           "; sock_ops: each passive child as it is made, TFO ones by fastopen_rsk",
                           events_of("tcp_fastopen_check")))
    lost = "kprobes unavailable" if tier != "kprobe" else "tcp_try_fastopen not traceable"
    gen = Resolution("tcp_fastopen_cookie_gen", "counters", [], True,
                     f"{lost}; no tracepoint sees the SYN's TFO option: per-namespace totals only",
                     [], counter="TCPFastOpenCookieReqd")
    if tier == "counters":
        return gen, Resolution("tcp_fastopen_check", "counters", [], True, f"{lost}; BPF disabled",
                               [], counter="TCPFastOpenPassive")
    marker = ("syn_fastopen_child" if facts.fields.get("syn_fastopen_child")
              else "syn_data_acked (data-less TFO children are not seen before 6.16)")
    return gen, Resolution("tcp_fastopen_check", "tracepoint", [Attachment("tracepoint", SET_STATE)],
                           True, f"{lost}; child leaving SYN_RECV with {marker}",
                           events_of("tcp_fastopen_check"))


def client_by_sockops(facts: KernelFacts, tier: str) -> bool:
    """Whether the client's outcome comes from sock_ops: always in the sockops tier, and in the
    kprobe tier too where the kernel has the callbacks. It decides each outcome at the SYN-ACK,
    so a connection is exact while it is open; the tracepoints can only resolve it at its next
    state change (its end), and run for every transition of every socket."""
    return tier == "sockops" or (tier == "kprobe" and not _sockops_ok(facts))


def _active(facts: KernelFacts, tier: str, sockops: bool) -> Resolution:
    point = "tcp_send_syn_data"
    completion = [Attachment("tracepoint", SET_STATE), Attachment("tracepoint", DESTROY)]
    if tier == "counters":
        return Resolution(point, "counters", [], True, "BPF disabled", [], counter="TCPFastOpenActive")
    if tier == "sockops":
        return Resolution(point, "sockops", [SOCK_OPS], True,
                          "sock_ops: connect (TFO attempts tracked), outcome decided at the SYN-ACK "
                          "(acked: snd_una == snd_nxt) or when the SYN gives up", events_of(point))
    # kprobe: the connecting task is read by a kprobe (the sock_ops programs of 6.1 and 6.12 may
    # not ask who the current task is); the rest by sock_ops where the kernel has it (its entry
    # alone: what the SYN carried and the SYN-ACK's outcome, exact while the connection is
    # open), else by the kprobe's return and the tracepoints when the connection next changes
    # state.
    if sockops:
        how = ("entry names the connecting task (6.1's and 6.12's sock_ops may not); what the SYN "
               "carried and the SYN-ACK outcome from sock_ops (exact while the connection is open)")
    else:
        how = ("return reads syn_data/syn_fastopen/fastopen_client_fail; SYN-ACK outcome from "
               "sock:inet_sock_set_state (when the connection next changes state)")
    if tier == "kprobe":
        for symbol, named in ((point, "traceable;"), ("tcp_connect", "not in kallsyms (inlined into "
                                                                      "tcp_connect); tcp_connect")):
            if facts.traceable(symbol):
                probes = [Attachment("kprobe", symbol, "on_connect"), SOCK_OPS] if sockops \
                    else _probe_pair(symbol, "on_connect") + completion
                return Resolution(point, "kprobe", probes, symbol != point, f"{named} {how}",
                                  events_of(point))
    return Resolution(point, "tracepoint", completion, True,
                      "SYN contents read when the socket leaves SYN_SENT, SYN-ACK outcome at its "
                      "next transition or destruction (counted when the connection ends)",
                      events_of(point))


def _tw(facts: KernelFacts, tier: str) -> Resolution:
    point = "tcp_twsk_unique"
    if tier == "kprobe" and facts.traceable(point):
        return Resolution(point, "kprobe", _probe_pair(point, "on_twsk_unique"), False,
                          "traceable", events_of(point))
    if tier == "sockops":
        return Resolution(point, "sockops", [SOCK_OPS], True,
                          "kprobes unavailable; sock_ops: each connect that took over a TIME-WAIT "
                          "4-tuple (granted, == TWRecycled), its age in whole seconds; refusals are "
                          "not seen (connect_eaddrnotavail counts the connects they fail)",
                          [E.TW_REUSE_GRANTED])
    why = ("kprobes unavailable" if tier != "kprobe" else "not traceable") + \
        "; no tracepoint sees TIME-WAIT sockets: per-namespace totals only"
    return Resolution(point, "counters", [], True, why, [], counter="TWRecycled")


def _connect_errors(facts: KernelFacts, tier: str) -> Resolution:
    """Not a design-card point: TCP connect()s failing with EADDRNOTAVAIL (no local port)."""
    point = "connect_eaddrnotavail"
    at_exit = facts.fields.get("syscall_regs", False)
    atts = [Attachment("tracepoint", tp) for tp in CONNECT_SYSCALL[at_exit:]]
    if tier == "counters":
        return Resolution(point, "counters", [], True, "BPF disabled; no kernel counter", [])
    if not all(a.target.replace(":", "/") in facts.tracepoints for a in atts):
        return Resolution(point, "counters", [], True, "syscall tracepoints missing "
                          "(CONFIG_FTRACE_SYSCALLS); no kernel counter", [], missing=tuple(atts))
    return Resolution(point, tier, atts, False,
                      "extra point: each TCP connect(2) that fails with EADDRNOTAVAIL (every local "
                      "port taken for the destination, or held by TIME-WAIT sockets), per process "
                      "and remote port; " + ("its arguments read at the exit" if at_exit else
                                             "its arguments kept from the entry"), events_of(point))


def _blackhole(facts: KernelFacts, tier: str, sockops: bool) -> Resolution:
    point, ofo = "tcp_fastopen_active_disable", "tcp_fastopen_active_disable_ofo_check"
    if tier == "kprobe" and sockops and facts.traceable(DETECT):
        # the out-of-order check runs as every socket is destroyed: a kprobe there would run for
        # every connection of the host; sock_ops replays it as a tracked TFO client closes
        return Resolution(point, "kprobe", [DETECT_PROBE, SOCK_OPS], True,
                          "inlined into its callers (extra point: blackhole disables): a kprobe "
                          "on the retransmission timeout's detection, and the FIN-only out-of-order "
                          "check replayed by sock_ops as a TFO client closes (a kprobe on it would run "
                          "at every socket's destruction), the kernel's values", events_of(point))
    if tier == "kprobe" and facts.traceable(DETECT) and facts.traceable(ofo):
        # tcp_fastopen.c calls it inline from both its callers: a kprobe on it sees neither
        return Resolution(point, "kprobe", [DETECT_PROBE, Attachment("kprobe", ofo, "on_ofo_check")], True,
                          "inlined into its callers (extra point: blackhole disables): kprobes on "
                          "both (the retransmission timeout's detection, the FIN-only out-of-order "
                          "check at close), the kernel's conditions replayed with its values",
                          events_of(point))
    if tier == "sockops":
        return Resolution(point, "sockops", [SOCK_OPS], True,
                          "kprobes unavailable; sock_ops: the kernel's two callers, replayed with "
                          "its values: a TFO socket's third retransmission timeout, and a TFO "
                          "socket closing with no data received and only a FIN out of order",
                          events_of(point))
    return Resolution(point, "counters", [], True,
                      "kprobes unavailable" if tier != "kprobe" else "not traceable",
                      [], counter="TCPFastOpenBlackhole")


def _detect(facts: KernelFacts, tier: str, sockops: bool) -> Resolution:
    """Not a design-card point: the kernel's blackhole detection at a retransmission timeout,
    the TCPFastOpenActiveFail that no SYN-ACK explains."""
    point = DETECT
    if tier == "kprobe" and facts.traceable(point):
        return Resolution(point, "kprobe", [DETECT_PROBE], False,
                          "traceable (extra point: TFO sockets' third retransmission timeout)",
                          events_of(point))
    if tier == "sockops" or (tier == "kprobe" and sockops):
        who = "TFO clients and TFO children" if tier == "sockops" else "TFO clients (not TFO children)"
        return Resolution(point, tier, [SOCK_OPS], True,
                          f"{'kprobes unavailable' if tier == 'sockops' else 'not traceable'}; "
                          f"sock_ops: the retransmission timeouts of {who}, right after the "
                          "kernel's check, with its values", events_of(point))
    return Resolution(point, "counters", [], True,
                      "kprobes unavailable; no tracepoint sees a retransmission timeout"
                      if tier != "kprobe" else "not traceable", [], counter="TCPFastOpenActiveFail")


def _cgroup_names(facts: KernelFacts, tier: str) -> Resolution:
    """Not a design-card point and no event of its own: the names of the `cgroup` label."""
    point = "cgroup_mkdir"
    if tier != "counters" and CGROUP_MKDIR.replace(":", "/") in facts.tracepoints:
        return Resolution(point, tier, [Attachment("tracepoint", CGROUP_MKDIR)], False,
                          "extra point: each new cgroup's path, so a client whose cgroup is gone "
                          "before its counts are read keeps its cgroup label", [])
    lost = "BPF disabled" if tier == "counters" else "tracepoint missing"
    missing = () if tier == "counters" else (Attachment("tracepoint", CGROUP_MKDIR),)
    return Resolution(point, "counters", [], True,
                      f"{lost}: cgroup names are read from the cgroup tree when counts are read; "
                      "a cgroup removed before then is labelled cgroup=\"\"", [], missing=missing)


def resolve(facts: KernelFacts, mode: str = "auto", sockops: bool = True) -> Plan:
    """sockops=False: the kprobe tier without its sock_ops client side (after it failed)."""
    tier = choose_tier(facts, mode)
    gen, check = _passive(facts, tier)
    names = _cgroup_names(facts, tier)
    errors = _connect_errors(facts, tier)
    by_sockops = sockops and client_by_sockops(facts, tier)
    active = _active(facts, tier, by_sockops)
    tw = _tw(facts, tier)
    blackhole, detect = _blackhole(facts, tier, by_sockops), _detect(facts, tier, by_sockops)
    points = [gen, check, active, tw, blackhole, detect, errors, names]
    events = {e for r in points for e in r.events}
    kprobed = {a.fn for r in points for a in r.attachments if a.kind == "kprobe"}
    traced = {a.target for r in points for a in r.attachments if a.kind == "tracepoint"}
    defines = {
        "PASSIVE_KPROBE": int("on_try_fastopen" in kprobed),
        "ACTIVE_KPROBE": int("on_connect" in kprobed),
        "TW_KPROBE": int("on_twsk_unique" in kprobed),
        "BLACKHOLE_KPROBE": int("on_ofo_check" in kprobed),
        "BLACKHOLE_SOCKOPS": int(SOCK_OPS in blackhole.attachments),
        "DETECT_KPROBE": int(DETECT_PROBE.fn in kprobed),
        "DETECT_SOCKOPS": int(SOCK_OPS in detect.attachments),
        "KERNEL_HZ": facts.hz,  # 0: the blackhole state's times are unknown
        "CGROUP_NAMES": int(bool(names.attachments)),
        "CONNECT_ERRORS": int(bool(errors.attachments)),
        "CONNECT_AT_EXIT": int(errors.attachments == [Attachment("tracepoint", CONNECT_SYSCALL[1])]),
        "STATE_TRACEPOINTS": int(SET_STATE in traced),
        "SOCKOPS": int(any(SOCK_OPS in r.attachments for r in points)),
        "SOCKOPS_PASSIVE": int(gen.tier == "sockops"),
        "SOCKOPS_ACTIVE": int(SOCK_OPS in active.attachments),
        "TW_SOCKOPS": int(tw.tier == "sockops"),
    }
    return Plan(mode=mode, tier=tier, points=points, defines=defines, events=events)


def fall_back(plan: Plan, facts: KernelFacts, reason: str, detail: str, fix: str,
              sockops_failed: bool = False) -> Plan:
    """The plan one step down (auto mode, after a load or attach failure): the kprobe tier
    without sock_ops when that part failed, else one tier down. The first failure is kept:
    it is why the planned plan does not run."""
    if sockops_failed and plan.tier == "kprobe" and plan.defines.get("SOCKOPS"):
        new = resolve(facts, "kprobe", sockops=False)
    else:
        lower = {"kprobe": "tracepoint", "sockops": "tracepoint", "tracepoint": "counters"}[plan.tier]
        if lower == "tracepoint" and _tracepoint_ok(facts):
            lower = "counters"
        new = resolve(facts, lower)
    new.mode = plan.mode
    new.degraded = plan.degraded or Degraded(plan, reason, detail, fix)
    return new
