"""Degradation on this kernel, for real: a kprobe kernel's facts with an unreadable kallsyms."""

from __future__ import annotations

import dataclasses

import pytest

from tfowatch.core.plan import PlanError


@pytest.mark.usefixtures("root_bpf")
def test_unreadable_kallsyms_on_a_kprobe_kernel_degrades_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """Facts of a kprobe kernel whose /proc/kallsyms this process could not read (systemd's
    ProtectKernelTunables): no kprobe target is known, so the kprobe tier is not tried; the
    tracepoint tier runs (on this kernel, for real), one ERROR names the fix, and --strict
    refuses instead."""
    from tfowatch.core.kernel import detect
    from tfowatch.core.pipeline import load_plan

    here = detect()
    if "sock/inet_sock_set_state" not in here.tracepoints:
        pytest.skip("this kernel has no sock:inet_sock_set_state tracepoint")
    blind = dataclasses.replace(here, kprobes=True, kprobes_why="", kallsyms_error="cannot read "
                                "/proc/kallsyms: Permission denied")
    plan, probes = load_plan(blind, "auto")
    try:
        assert plan.tier == "tracepoint" and plan.planned_tier == "kprobe"
        assert plan.degraded is not None and plan.degraded.reason == "kallsyms_unreadable"
        assert all(probes.attached.values())
    finally:
        probes.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ProtectKernelTunables" in errors[0], errors
    with pytest.raises(PlanError, match=r"strict: kprobe tier unavailable .*kallsyms"):
        load_plan(blind, "auto", strict=True)
