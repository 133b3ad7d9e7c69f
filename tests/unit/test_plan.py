"""Probe-plan resolution against recorded facts of Debian 6.1, 6.12 and our 6.18 host."""

from __future__ import annotations

import dataclasses

import pytest
from support import facts

from tfowatch.core.events import EVENTS
from tfowatch.core.events import EventType as E
from tfowatch.core.kernel import KernelFacts
from tfowatch.core.plan import SOCK_OPS, PlanError, fall_back, resolve


def targets(plan, point: str) -> set[str]:  # type: ignore[no-untyped-def]
    (r,) = [r for r in plan.points if r.point == point]
    return {f"{a.kind}:{a.target}" for a in r.attachments}


@pytest.mark.parametrize("release", ["6.1.", "6.12."])
def test_debian_kernels_get_the_kprobe_tier(release: str) -> None:
    plan = resolve(facts(release), "auto")
    assert plan.tier == "kprobe"
    assert targets(plan, "tcp_fastopen_cookie_gen") == {"kprobe:tcp_try_fastopen",
                                                         "kretprobe:tcp_try_fastopen"}
    assert targets(plan, "tcp_fastopen_check") == targets(plan, "tcp_fastopen_cookie_gen")
    # The connecting task from the tcp_connect kprobe's entry, the rest from sock_ops (the
    # outcome at the SYN-ACK, exact while a connection is open): no kretprobe, and neither
    # per-transition tracepoint is attached.
    assert targets(plan, "tcp_send_syn_data") == {"kprobe:tcp_connect", "sockops:cgroup2_root"}
    assert not {a.target for a in plan.attachments} & {"sock:inet_sock_set_state", "tcp:tcp_destroy_sock"}
    assert not plan.outcomes_at_close
    assert targets(plan, "tcp_twsk_unique") == {"kprobe:tcp_twsk_unique", "kretprobe:tcp_twsk_unique"}
    assert plan.events == {s.type for s in EVENTS if s.metrics}  # plain connects are doctor's
    assert "tfowatch_tw_reuse_age_seconds" in {m.name for m in plan.metrics}
    assert plan.defines == {"PASSIVE_KPROBE": 1, "ACTIVE_KPROBE": 1, "TW_KPROBE": 1,
                            "BLACKHOLE_KPROBE": 0, "CGROUP_NAMES": 1, "CONNECT_ERRORS": 1,
                            "CONNECT_AT_EXIT": 1, "STATE_TRACEPOINTS": 0, "SOCKOPS": 1, "SOCKOPS_PASSIVE": 0,
                            "SOCKOPS_ACTIVE": 1, "TW_SOCKOPS": 0, "BLACKHOLE_SOCKOPS": 1,
                            "DETECT_KPROBE": 1, "DETECT_SOCKOPS": 0, "KERNEL_HZ": 250}
    # The blackhole detection's TCPFastOpenActiveFail: the kernel's own check, kprobed (both
    # sides: a server's TFO child times out too).
    assert targets(plan, "tcp_fastopen_active_detect_blackhole") == {
        "kprobe:tcp_fastopen_active_detect_blackhole"}
    # The FIN-only out-of-order check: replayed by sock_ops as a TFO client closes, not kprobed
    # where the kernel runs it (every socket's destruction).
    assert targets(plan, "tcp_fastopen_active_disable") == {
        "kprobe:tcp_fastopen_active_detect_blackhole", "sockops:cgroup2_root"}
    assert "tcp_fastopen_active_disable_ofo_check" not in {a.target for a in plan.attachments}
    assert targets(plan, "connect_eaddrnotavail") == {"tracepoint:syscalls:sys_exit_connect"}
    assert targets(plan, "cgroup_mkdir") == {"tracepoint:cgroup:cgroup_mkdir"}
    # Substitutes say what they replace and why; tcp_twsk_unique is used as designed.
    subs = {r.point: r.substitute for r in plan.points}
    assert subs["tcp_fastopen_cookie_gen"] and subs["tcp_send_syn_data"]
    assert not subs["tcp_twsk_unique"]
    assert set(plan.reconciled) == {"cookie_requests", "syn_data_accepted", "invalid_cookie",
                                    "queue_overflow", "syn_data_acked", "active_fail",
                                    "tw_reuse_granted", "blackhole_disables"}


@pytest.mark.parametrize("release", ["6.1.", "6.12.", "6.18."])
def test_sockops_mode_sees_every_tfo_point_of_both_sides_with_one_program(release: str) -> None:
    """Issue 17: without kprobes, the server side's cookie requests, cookies and fallbacks
    too, and TIME-WAIT takeovers (grants only; refusals as the connects they fail). Issue 18:
    the blackhole detection's timeouts and disables too."""
    plan = resolve(facts(release), "sockops")
    assert plan.tier == "sockops" and plan.defines["SOCKOPS"] == 1
    assert [a for a in plan.attachments if a.kind != "tracepoint"] == [SOCK_OPS]
    for point in ("tcp_fastopen_cookie_gen", "tcp_fastopen_check", "tcp_send_syn_data", "tcp_twsk_unique"):
        assert targets(plan, point) == {"sockops:cgroup2_root"}
    assert plan.events == {s.type for s in EVENTS if s.point in (
        "tcp_fastopen_cookie_gen", "tcp_fastopen_check", "tcp_send_syn_data",
        "connect_eaddrnotavail", "tcp_fastopen_active_disable",
        "tcp_fastopen_active_detect_blackhole")} | {E.TW_REUSE_GRANTED}
    assert set(plan.reconciled) == {"cookie_requests", "syn_data_accepted", "invalid_cookie",
                                    "queue_overflow", "syn_data_acked", "active_fail",
                                    "tw_reuse_granted", "blackhole_disables"}
    assert targets(plan, "connect_eaddrnotavail") == {"tracepoint:syscalls:sys_exit_connect"}
    for point in ("tcp_fastopen_active_disable", "tcp_fastopen_active_detect_blackhole"):
        assert targets(plan, point) == {"sockops:cgroup2_root"}
    assert plan.defines["BLACKHOLE_SOCKOPS"] == plan.defines["DETECT_SOCKOPS"] == 1


def test_sockops_mode_needs_the_header_option_callbacks() -> None:
    old = dataclasses.replace(facts("6.18."), fields={**facts("6.18.").fields, "sock_ops_hdr_opt": False})
    with pytest.raises(PlanError, match=r"Linux 5\.10"):
        resolve(old, "sockops")


def without_sockops(f: KernelFacts) -> KernelFacts:
    return dataclasses.replace(f, fields={**f.fields, "sock_ops_hdr_opt": False})


def test_host_618_without_kprobes_gets_sockops() -> None:
    """auto: without kprobes, the sockops tier (a superset of the tracepoints' events)."""
    plan = resolve(facts("6.18."), "auto")
    assert plan.tier == "sockops" and plan.mode == "auto"
    assert plan.events > resolve(facts("6.18."), "tracepoint").events
    assert E.COOKIE_REQUEST in plan.events and E.INVALID_COOKIE in plan.events


def test_without_kprobes_or_sock_ops_tracepoints() -> None:
    plan = resolve(without_sockops(facts("6.18.")), "auto")
    assert plan.tier == "tracepoint"
    assert not any(a.kind.startswith("k") for a in plan.attachments)
    assert plan.events == {E.SYN_DATA_ACCEPTED, E.SYN_DATA_SENT, E.SYN_DATA_ACKED,
                           E.COOKIE_UNAVAILABLE, E.DATA_NOT_ACKED, E.SYN_RETRANSMITTED,
                           E.TFO_DISABLED, E.CONNECT_EADDRNOTAVAIL}
    names = {m.name for m in plan.metrics}
    assert "tfowatch_cookie_requests_total" not in names  # absent, not zero
    assert "tfowatch_tw_reuse_total" not in names
    assert "syn_fastopen_child" in next(r.why for r in plan.points if r.point == "tcp_fastopen_check")
    tw = next(r for r in plan.points if r.point == "tcp_twsk_unique")
    assert (tw.tier, tw.counter) == ("counters", "TWRecycled")
    assert targets(plan, "cgroup_mkdir") == {"tracepoint:cgroup:cgroup_mkdir"}


def test_without_the_cgroup_tracepoint_the_names_say_what_is_lost() -> None:
    f = dataclasses.replace(facts("6.18."), tracepoints=[t for t in facts("6.18.").tracepoints
                                                         if t != "cgroup/cgroup_mkdir"])
    plan = resolve(f, "tracepoint")
    names = next(r for r in plan.points if r.point == "cgroup_mkdir")
    assert plan.tier == "tracepoint" and plan.defines["CGROUP_NAMES"] == 0
    assert names.attachments == [] and names.substitute and 'labelled cgroup=""' in names.why
    # loud in tfowatch_probe_attached (and so TfowatchProbeDetached), not only in `probes`
    assert ("cgroup_mkdir", "tracepoint:cgroup:cgroup_mkdir", "tracepoint", False) in \
        plan.attachment_states(lambda _a: True)


def test_without_syscall_tracepoints_connect_errors_are_missing_not_silent() -> None:
    f = dataclasses.replace(facts("6.18."), tracepoints=[t for t in facts("6.18.").tracepoints
                                                         if not t.startswith("syscalls/")])
    plan = resolve(f, "sockops")
    errors = next(r for r in plan.points if r.point == "connect_eaddrnotavail")
    assert plan.defines["CONNECT_ERRORS"] == 0 and errors.tier == "counters"
    assert "tfowatch_connect_eaddrnotavail_total" not in {m.name for m in plan.metrics}
    assert ("connect_eaddrnotavail", "tracepoint:syscalls:sys_exit_connect", "sockops", False) in \
        plan.attachment_states(lambda _a: True)
    off = resolve(f, "counters")
    assert not [s for s in off.attachment_states(lambda _a: True) if s[0] == "cgroup_mkdir"]


def test_connect_errors_read_the_arguments_at_exit_where_the_registers_are_known() -> None:
    """x86-64 (pt_regs.si in BTF): one tracepoint per connect(2); elsewhere the entry keeps the
    arguments for the exit, two runs and a map entry per call."""
    plan = resolve(facts("6.18."), "sockops")
    assert targets(plan, "connect_eaddrnotavail") == {"tracepoint:syscalls:sys_exit_connect"}
    assert plan.defines["CONNECT_AT_EXIT"] == 1
    f = facts("6.18.")
    f = dataclasses.replace(f, fields={**f.fields, "syscall_regs": False})
    plan = resolve(f, "sockops")
    assert targets(plan, "connect_eaddrnotavail") == {"tracepoint:syscalls:sys_enter_connect",
                                                      "tracepoint:syscalls:sys_exit_connect"}
    assert plan.defines["CONNECT_AT_EXIT"] == 0
    assert "kept from the entry" in next(r.why for r in plan.points if r.point == "connect_eaddrnotavail")


def test_explicit_kprobe_mode_without_kprobes_is_an_error() -> None:
    with pytest.raises(PlanError, match="kprobes unavailable"):
        resolve(facts("6.18."), "kprobe")


def test_counters_mode_attaches_nothing() -> None:
    plan = resolve(facts("6.1."), "counters")
    assert plan.tier == "counters" and plan.attachments == [] and plan.events == set()


def test_untraceable_symbol_falls_back_per_point() -> None:
    f = facts("6.1.")
    f = dataclasses.replace(f, symbols=dict(f.symbols, tcp_try_fastopen=False, tcp_connect=False))
    plan = resolve(f, "auto")
    assert plan.tier == "kprobe"
    check = next(r for r in plan.points if r.point == "tcp_fastopen_check")
    assert check.tier == "tracepoint" and E.COOKIE_REQUEST not in plan.events
    assert plan.defines["PASSIVE_KPROBE"] == 0 and plan.defines["ACTIVE_KPROBE"] == 0
    # 6.1 has no syn_fastopen_child: the plan says what that costs.
    assert "data-less" in check.why


@pytest.mark.parametrize("release", ["6.1.", "6.12."])
def test_kprobe_tier_without_sock_ops_reads_the_client_side_from_kprobes_and_tracepoints(
        release: str) -> None:
    """What the kprobe tier runs when its sock_ops part cannot load (e.g. no cgroup v2): a
    step down, loud, that keeps the kprobes."""
    f = facts(release)
    planned = resolve(f, "auto")
    running = fall_back(planned, f, "no_cgroup2", "no cgroup2 mount", "mount it", sockops_failed=True)
    assert running.tier == "kprobe" and running.degraded is not None
    assert running.degraded.reason == "no_cgroup2" and running.degraded.planned is planned
    assert {"kprobe:tcp_connect", "kretprobe:tcp_connect", "tracepoint:sock:inet_sock_set_state",
            "tracepoint:tcp:tcp_destroy_sock"} == targets(running, "tcp_send_syn_data")
    assert running.defines["SOCKOPS"] == 0 and running.defines["STATE_TRACEPOINTS"] == 1
    assert running.events == planned.events and running.outcomes_at_close
    assert "when it ends" in running.degraded.describe(running.tier)
    # the sock_ops attachment it lacks is exported as not attached
    assert ("tcp_send_syn_data", "sockops:cgroup2_root", "kprobe", False) in \
        running.attachment_states(lambda a: True)
    # any other failure of the kprobe tier goes one tier down, as before
    assert fall_back(planned, f, "attach_failed", "x", "y").tier == "tracepoint"


def test_named_symbol_is_used_where_it_exists() -> None:
    f = facts("6.1.")
    f = dataclasses.replace(f, symbols=dict(f.symbols, tcp_send_syn_data=True))
    r = next(r for r in resolve(f, sockops=False).points if r.point == "tcp_send_syn_data")
    assert not r.substitute and "kprobe:tcp_send_syn_data" in {f"{a.kind}:{a.target}" for a in r.attachments}


def test_missing_tracepoints_leave_sockops_or_else_counters_only() -> None:
    f = dataclasses.replace(facts("6.18."), tracepoints=[])
    assert resolve(f, "auto").tier == "sockops"  # it needs none of them
    assert resolve(without_sockops(f), "auto").tier == "counters"
    with pytest.raises(PlanError, match=r"Linux 5\.10"):
        resolve(without_sockops(f), "sockops")
    with pytest.raises(PlanError, match="tracepoint"):
        resolve(f, "tracepoint")


def test_sockops_needs_btf_and_headers_like_any_bcc_tier() -> None:
    host = facts("6.18.")
    for f in (dataclasses.replace(host, btf=False), dataclasses.replace(host, headers=False)):
        assert resolve(f, "auto").tier == "counters"
        with pytest.raises(PlanError, match="--mode sockops: no kernel"):
            resolve(f, "sockops")


def test_a_sockops_plan_falls_back_to_the_tracepoints() -> None:
    f = facts("6.18.")
    once = fall_back(resolve(f, "auto"), f, "sockops_denied", "EPERM", "grant CAP_NET_ADMIN")
    assert once.tier == "tracepoint" and once.planned_tier == "sockops" and once.mode == "auto"
    states = once.attachment_states(lambda a: True)
    assert ("tcp_send_syn_data", "sockops:cgroup2_root", "sockops", False) in states


def test_fall_back_goes_one_tier_down_and_keeps_the_first_reason() -> None:
    f = facts("6.12.")
    plan = resolve(f, "auto")
    once = fall_back(plan, f, "attach_failed", "cannot attach kprobe x", "fix it")
    twice = fall_back(once, f, "compile_failed", "clang said no", "other fix")
    assert (once.tier, twice.tier) == ("tracepoint", "counters")
    assert plan.degraded is None and plan.planned_tier == "kprobe"  # the input is not changed
    assert once.degraded and twice.degraded
    assert once.degraded.reason == twice.degraded.reason == "attach_failed"
    assert twice.planned_tier == "kprobe" and twice.mode == "auto"
    assert twice.degraded.describe(twice.tier) \
        == "kprobe tier unavailable (cannot attach kprobe x): fix it; running the counters tier"


def test_a_degraded_plan_lists_the_planned_probes_it_lacks_as_not_attached() -> None:
    f = facts("6.12.")
    planned = resolve(f, "auto")
    running = fall_back(planned, f, "attach_failed", "x", "y")
    states = running.attachment_states(lambda a: True)
    missing = {(p, t, tier) for p, t, tier, ok in states if not ok}
    # every kprobe of the plan is reported 0, under its planned point and tier
    want = {(r.point, f"{a.kind}:{a.target}", r.tier) for r in planned.points
            for a in r.attachments if a.kind != "tracepoint"}
    assert want and want <= missing
    # the tracepoints the running tier does attach are reported once, as attached
    assert ("tcp_send_syn_data", "tracepoint:sock:inet_sock_set_state", "tracepoint", True) in states
    assert len({(p, t) for p, t, _, _ in states}) == len(states)
    assert all(ok for _, _, _, ok in planned.attachment_states(lambda a: True))


def test_unknown_mode() -> None:
    with pytest.raises(PlanError, match="unknown mode"):
        resolve(facts("6.1."), "fentry")
