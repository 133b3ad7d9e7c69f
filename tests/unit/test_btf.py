"""BTF offsets: checked against bpftool, an independent reader of the same BTF."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tfowatch.core.btf import VMLINUX_BTF, Btf, BtfError

CASES = [
    ("tcp_sock", "fastopen_req"), ("tcp_sock", "syn_data"), ("tcp_sock", "syn_fastopen"),
    ("tcp_sock", "syn_data_acked"), ("tcp_sock", "fastopen_client_fail"),
    ("tcp_sock", "fastopen_connect"), ("tcp_timewait_sock", "tw_ts_recent_stamp"),
    ("tcp_fastopen_cookie", "len"), ("tcp_skb_cb", "end_seq"), ("tcp_skb_cb", "seq"),
    ("sk_buff", "cb"), ("inet_timewait_sock", "tw_substate"),
]


@pytest.fixture(scope="module")
def btf() -> Btf:
    if not VMLINUX_BTF.exists():
        pytest.skip("kernel has no /sys/kernel/btf/vmlinux")
    return Btf.load()


@pytest.fixture(scope="module")
def bpftool_raw() -> str:
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed (make setup installs it)")
    return subprocess.run(["bpftool", "btf", "dump", "file", str(VMLINUX_BTF), "format", "raw"],
                          check=True, capture_output=True, text=True).stdout


def bpftool_member(raw: str, struct: str, member: str) -> tuple[int, int]:
    """(bits_offset, bitfield_size) of a direct member, as bpftool prints it."""
    block = re.search(rf"^\[\d+\] STRUCT '{struct}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", raw, re.M)
    assert block, f"bpftool has no struct {struct}"
    m = re.search(rf"^\t'{member}' type_id=\d+ bits_offset=(\d+)(?: bitfield_size=(\d+))?",
                  block.group(1), re.M)
    assert m, f"bpftool: {struct} has no {member}"
    return int(m.group(1)), int(m.group(2) or 0)


@pytest.mark.parametrize(("struct", "member"), CASES)
def test_offsets_match_bpftool(btf: Btf, bpftool_raw: str, struct: str, member: str) -> None:
    f = btf.field(struct, member)
    assert (f.bit_offset, f.bit_size) == bpftool_member(bpftool_raw, struct, member)


def test_nested_path_is_sum_of_parts(btf: Btf, bpftool_raw: str) -> None:
    sk_common = bpftool_member(bpftool_raw, "sock", "__sk_common")[0]
    skc_net = bpftool_member(bpftool_raw, "sock_common", "skc_net")[0]
    assert btf.field("sock", "__sk_common.skc_net.net").bit_offset == sk_common + skc_net
    ns = bpftool_member(bpftool_raw, "net", "ns")[0]
    inum = bpftool_member(bpftool_raw, "ns_common", "inum")[0]
    assert btf.field("net", "ns.inum").bit_offset == ns + inum


def test_missing_member_and_struct_raise(btf: Btf) -> None:
    with pytest.raises(BtfError, match="no member"):
        btf.field("tcp_sock", "no_such_field")
    with pytest.raises(BtfError, match="not in BTF"):
        btf.field("no_such_struct", "x")
    assert not btf.has_field("tcp_sock", "no_such_field")


def test_rejects_garbage() -> None:
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 64)


def test_functions_are_those_of_kallsyms(btf: Btf) -> None:
    """The BTF FUNC set is how facts of other kernels are recorded; it must agree with
    the running kernel's own symbol table for every symbol the plan cares about."""
    from tfowatch.core.kernel import SYMBOLS, _kallsyms

    present, error = _kallsyms(SYMBOLS)
    assert error == "" and {s: btf.has_function(s) for s in SYMBOLS} == present
