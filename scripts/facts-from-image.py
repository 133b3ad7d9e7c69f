#!/usr/bin/env python3
"""Record the KernelFacts of a kernel we do not run, from its Debian image package.

    .venv/bin/python scripts/facts-from-image.py EXTRACTED_DEB_ROOT RELEASE > tests/facts/RELEASE.json

Everything comes from the BTF section of the decompressed vmlinuz (Debian's
System.map is a stub): pahole emits a FUNC only for functions with an ftrace entry
(not inlined), and a btf_trace_NAME typedef per tracepoint. kprobes from the config.
tests/unit/test_plan.py checks this method against the host's real kallsyms facts.
"""

from __future__ import annotations

import lzma
import subprocess
import sys
import tempfile
from pathlib import Path

from tfowatch.core.btf import Btf
from tfowatch.core.kernel import OPTIONAL_FIELDS, SYMBOLS, TRACEPOINTS, KernelFacts, kernel_hz

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decompress(vmlinuz: bytes) -> bytes:
    i = vmlinuz.find(XZ_MAGIC)
    if i >= 0:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[i:])
    i = vmlinuz.find(ZSTD_MAGIC)
    if i >= 0:
        out = subprocess.run(["zstd", "-dc"], input=vmlinuz[i:], capture_output=True)
        return out.stdout  # trailing data makes zstd exit non-zero after the frame
    raise SystemExit("no xz or zstd payload in vmlinuz")


def btf_of(vmlinux: bytes) -> Btf:
    with tempfile.TemporaryDirectory() as d:
        elf, sect = Path(d) / "vmlinux", Path(d) / "btf"
        elf.write_bytes(vmlinux)
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.BTF", str(elf), str(sect)],
                       check=True)
        return Btf(sect.read_bytes())


def _has_tracepoint(btf: Btf, tp: str, syscalls: bool) -> bool:
    """Syscall events are made by ftrace (CONFIG_FTRACE_SYSCALLS), not by TRACE_EVENT: they
    have no btf_trace_ typedef."""
    category, name = tp.split("/")
    return syscalls if category == "syscalls" else f"btf_trace_{name}" in btf.typedefs


def facts_from_btf(btf: Btf, release: str, kprobes: bool, syscalls: bool = True, hz: int = 0) -> KernelFacts:
    present = {s: btf.has_function(s) for s in SYMBOLS}
    return KernelFacts(
        release=release, kprobes=kprobes, kprobes_why="", btf=True, headers=True,
        symbols={s: kprobes and p for s, p in present.items()}, present=present,
        tracepoints=[tp for tp in TRACEPOINTS if _has_tracepoint(btf, tp, syscalls)],
        fields={k: btf.has_field(*v) for k, v in OPTIONAL_FIELDS.items()}, sysctls={}, hz=hz,
    )


def main() -> None:
    root, release = Path(sys.argv[1]), sys.argv[2]
    boot = root / "boot"
    config = (boot / f"config-{release}").read_text()
    btf = btf_of(decompress((boot / f"vmlinuz-{release}").read_bytes()))
    print(facts_from_btf(btf, release, "CONFIG_KPROBES=y" in config,
                         "CONFIG_FTRACE_SYSCALLS=y" in config, kernel_hz(config)).to_json())


if __name__ == "__main__":
    main()
