"""Every BPF program compiles and passes the verifier on the running kernel.

kprobe programs cannot attach here (no CONFIG_KPROBES) but BCC's load_func still
runs them through the verifier; the VM lab attaches them for real.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import facts

from tfowatch.bpf import loader as bpfprog
from tfowatch.bpf.adopt import BPF_CGROUP_SETSOCKOPT, BPF_PROG_TYPE_CGROUP_SOCKOPT
from tfowatch.core.btf import Btf
from tfowatch.core.kernel import detect
from tfowatch.core.plan import resolve

pytestmark = pytest.mark.usefixtures("root_bpf")

# Every function the kprobe plans attach (Debian 6.1 and 6.12, from the recorded facts): the
# names come from the plan, so a plan that names a function the C lacks fails here.
def kprobe_funcs(**resolve_args: bool) -> list[str]:
    return sorted({a.fn for release in ("6.1.", "6.12.")
                   for a in resolve(facts(release), "kprobe", **resolve_args).attachments
                   if a.kind in ("kprobe", "kretprobe")})


KPROBE_FUNCS = kprobe_funcs(sockops=False)
ALL_KPROBES = {"PASSIVE_KPROBE": 1, "ACTIVE_KPROBE": 1, "TW_KPROBE": 1, "BLACKHOLE_KPROBE": 1,
               "DETECT_KPROBE": 1}
# The kprobe tier where the kernel has sock_ops: its client side from the sock_ops program.
KPROBE_TIER = resolve(facts("6.12."), "kprobe").defines


def compile_with(overrides: dict[str, int], mode: str = "tracepoint") -> Any:
    bcc = bpfprog.import_bcc()
    plan = resolve(detect(), mode)
    flags = [f for f in bpfprog.cflags(Btf.load(), plan)
             if not any(f.startswith(f"-D{k}=") for k in overrides)]
    flags += [f"-D{k}={v}" for k, v in overrides.items()]
    return bcc.BPF(src_file=str(bpfprog.SOURCE).encode(), cflags=flags)


# run (counts in the kernel); top; doctor --watch; a kernel without cgroup:cgroup_mkdir; one
# without syscall tracepoints; one whose syscall registers are not known (not x86-64). Bound by
# BCC at load: sock:inet_sock_set_state, tcp:tcp_destroy_sock, cgroup:cgroup_mkdir,
# syscalls:sys_exit_connect (and sys_enter_connect where the arguments must be kept from it).
@pytest.mark.parametrize(("variant", "tracepoints"), [({"IN_KERNEL_COUNTS": 1}, 4), ({}, 4),
                                                      ({"PLAIN_CONNECTS": 1}, 4), ({"CGROUP_NAMES": 0}, 3),
                                                      ({"CONNECT_ERRORS": 0}, 3),
                                                      ({"CONNECT_AT_EXIT": 0}, 5)])
def test_tracepoint_tier_loads(variant: dict[str, int], tracepoints: int) -> None:
    b = compile_with(variant)
    try:
        assert b.num_open_tracepoints() == tracepoints
    finally:
        b.cleanup()


# Older kernels' code paths: TIME-WAIT age from tw_ts_recent_stamp (< 6.14), TFO child
# marker syn_data_acked (< 6.16), no fastopen_client_fail (< 5.5).
@pytest.mark.parametrize("variant", [
    {},
    {"HAVE_TW_ENTRY_STAMP": 0},
    {"HAVE_SYN_FASTOPEN_CHILD": 0, "HAVE_CLIENT_FAIL": 0},
    {"PLAIN_CONNECTS": 1},
    {"IN_KERNEL_COUNTS": 1},
])
def test_kprobe_programs_pass_the_verifier(variant: dict[str, int]) -> None:
    bcc = bpfprog.import_bcc()
    b = compile_with(ALL_KPROBES | variant)
    try:
        for fn in KPROBE_FUNCS:
            assert b.load_func(fn.encode(), bcc.BPF.KPROBE).fd >= 0
    finally:
        b.cleanup()


def test_the_plans_attach_every_kprobe_program() -> None:
    assert len(KPROBE_FUNCS) == 8, KPROBE_FUNCS  # entry+return of 3 points, blackhole disable, detection
    # With sock_ops for the client's side: the connecting task from tcp_connect's entry alone, and
    # the out-of-order blackhole check (run at every socket's destruction) from sock_ops.
    assert set(kprobe_funcs()) == set(KPROBE_FUNCS) - {"on_connect_ret", "on_ofo_check"}


@pytest.mark.parametrize("variant", [{}, {"PLAIN_CONNECTS": 1}, {"IN_KERNEL_COUNTS": 1}])
def test_kprobe_tier_with_its_sock_ops_client_side_passes_the_verifier(variant: dict[str, int]) -> None:
    """The kprobe tier as auto plans it on 6.1 and 6.12: kprobes for the server side, the
    connecting task and TIME-WAIT, sock_ops for the client's outcome, and neither
    per-transition tracepoint. (Loaded here on 6.18; the VM lab loads it on 6.1 and 6.12,
    whose sock_ops programs may not call bpf_get_current_pid_tgid.)"""
    bcc = bpfprog.import_bcc()
    b = compile_with(KPROBE_TIER | variant)
    try:
        assert b.num_open_tracepoints() == 2  # cgroup:cgroup_mkdir and connect(2)'s exit
        assert b.load_func(b"on_sock_ops", bcc.BPF.SOCK_OPS).fd >= 0
        for fn in kprobe_funcs():
            assert b.load_func(fn.encode(), bcc.BPF.KPROBE).fd >= 0
        with pytest.raises(Exception, match="on_adopt"):  # adoption is the sockops tier's
            b.load_func(b"on_adopt", BPF_PROG_TYPE_CGROUP_SOCKOPT, attach_type=BPF_CGROUP_SETSOCKOPT)
    finally:
        b.cleanup()


def test_tracepoint_only_build_has_no_kprobe_functions() -> None:
    b = compile_with({})
    try:
        with pytest.raises(Exception, match="on_try_fastopen"):
            b.load_func(b"on_try_fastopen", bpfprog.import_bcc().BPF.KPROBE)
    finally:
        b.cleanup()


# The sockops tier (issue 17): its one program passes the verifier in every build, and the two
# tracepoints it replaces are not compiled (cgroup:cgroup_mkdir and connect(2)'s exit stay);
# the kernels before fastopen_client_fail too.
@pytest.mark.parametrize("variant", [{"IN_KERNEL_COUNTS": 1}, {}, {"PLAIN_CONNECTS": 1},
                                     {"HAVE_CLIENT_FAIL": 0}])
def test_sockops_program_passes_the_verifier(variant: dict[str, int]) -> None:
    bcc = bpfprog.import_bcc()
    b = compile_with(variant, mode="sockops")
    try:
        assert b.num_open_tracepoints() == 2
        assert b.load_func(b"on_sock_ops", bcc.BPF.SOCK_OPS).fd >= 0
        # the cgroup setsockopt program that adopts listeners open before the start (6.12+)
        adopt = b.load_func(b"on_adopt", BPF_PROG_TYPE_CGROUP_SOCKOPT, attach_type=BPF_CGROUP_SETSOCKOPT)
        assert adopt.fd >= 0
    finally:
        b.cleanup()
