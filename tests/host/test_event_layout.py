"""tfowatch/bpf/tfowatch.h is the one definition of the event; the Python mirror must not drift."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tfowatch.bpf import loader as bpfprog
from tfowatch.core.events import EV_TYPE_MAX, CountKey, CountVal, EventType, RawEvent, RefuseReason

HEADER = bpfprog.BPF_DIR / "tfowatch.h"


def c_enum(name: str) -> dict[str, int]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    body = re.search(rf"enum {name} {{(.*?)}};", text, re.S)
    assert body, f"enum {name} not in {HEADER}"
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}


def test_event_types_match_header() -> None:
    c = c_enum("tfo_event_type")
    assert c.pop("EV_TYPE_MAX") == EV_TYPE_MAX
    assert c == {f"EV_{t.name}": t.value for t in EventType}


def test_refuse_reasons_match_header() -> None:
    assert c_enum("tw_refuse_reason") == {f"TW_{r.name}": r.value for r in RefuseReason}


@pytest.mark.parametrize(("struct", "mirror"), [("tfo_event", RawEvent), ("count_key", CountKey),
                                               ("count_val", CountVal)])
def test_struct_layout_matches_compiled_c(tmp_path: Path, struct: str,
                                          mirror: type[ctypes.Structure]) -> None:
    """Compile the header with the C compiler and compare offsets and sizes field by field."""
    fields = [name for name, *_ in mirror._fields_]
    prints = "".join(f'printf("{f} %zu %zu\\n", offsetof(struct {struct}, {f}), '
                     f"sizeof(((struct {struct} *)0)->{f}));" for f in fields)
    src = tmp_path / "layout.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
                   f'#include "{HEADER}"\nint main(void) {{ {prints} '
                   f'printf("sizeof %zu 0\\n", sizeof(struct {struct})); return 0; }}\n')
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = (line.split() for line in out.splitlines())
    c_layout = {name: (int(off), int(size)) for name, off, size in rows}
    py_layout = {f: (getattr(mirror, f).offset, getattr(mirror, f).size) for f in fields}
    py_layout["sizeof"] = (ctypes.sizeof(mirror), 0)
    assert c_layout == py_layout


@pytest.mark.usefixtures("root_bpf")
def test_bcc_sees_the_same_struct() -> None:
    """The BPF side: BCC's view of what perf_submit sends, and of the in-kernel counts map's
    key and value, equals the Python mirrors."""
    from tfowatch.core.btf import Btf
    from tfowatch.core.kernel import detect
    from tfowatch.core.plan import Variant, resolve

    bcc = bpfprog.import_bcc()
    plan = resolve(detect(), "tracepoint")
    flags = bpfprog.cflags(Btf.load(), plan, Variant(in_kernel_counts=True))
    b = bcc.BPF(src_file=str(bpfprog.SOURCE).encode(), cflags=flags)
    try:
        lib, mod = bcc.libbcc.lib, b.module
        n = lib.bpf_perf_event_fields(mod, b"events")
        bcc_fields = [lib.bpf_perf_event_field(mod, b"events", i).decode().split("#") for i in range(n)]
        counts = b[b"counts"]
        for bcc_struct, mirror in ((counts.Key, CountKey), (counts.Leaf, CountVal)):
            assert ctypes.sizeof(bcc_struct) == ctypes.sizeof(mirror)
            assert [f[0] for f in bcc_struct._fields_ if not f[0].startswith("__pad")] == \
                [f[0] for f in mirror._fields_]
    finally:
        b.cleanup()
    ctype: dict[str, Any] = {"__u64": ctypes.c_uint64, "__u32": ctypes.c_uint32, "__u16": ctypes.c_uint16,
             "__u8": ctypes.c_uint8, "char[16]": ctypes.c_char * 16,
             "__u8[16]": ctypes.c_uint8 * 16}
    assert [(name, ctypes.sizeof(ctype[t.replace(" ", "")])) for name, t in bcc_fields] == \
        [(f[0], ctypes.sizeof(f[1])) for f in RawEvent._fields_]
