"""What each kind of work costs inside a sock_ops program on this kernel: the price list behind
docs/PERFORMANCE.md's "where the time goes".

    bench/primitives.py [--seconds S]

Each variant is one sock_ops program on the host's root cgroup, alone, doing one kind of work
in every callback; plain TCP connections at a fixed rate (the C load generator, in namespaces
of its own) run past it, and bpf_stats gives its nanoseconds per run. A variant's cost is its
figure minus the empty program's, measured in the same run. Prints a Markdown table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]
import observers  # noqa: E402
import run  # noqa: E402

from tfowatch.bpf.loader import BPF_CGROUP_SOCK_OPS, link_cgroup  # noqa: E402
from tfowatch.core.cgroups import host_cgroup2_root  # noqa: E402

HEAD = r"""
static long (*kread)(void *dst, u32 size, const void *unsafe_ptr) = (void *)BPF_FUNC_probe_read_kernel;
struct key48 { u64 a, b; u32 c, d; u16 e; u8 f, g; char comm[16]; }; /* count_key's size */
BPF_HASH(hash, struct key48, u64, 1024);
BPF_ARRAY(array, u8, 65536);
BPF_TABLE("lru_hash", struct key48, u8, lru, 16384);
"""
READ = "{ u16 v = 0; kread(&v, 2, sk + 12); s += v; }\n"
DIRECT = "s += *(volatile u16 *)((void *)tp + 12);\n"
USE = "if (s == 1) return 0;"
SK = "u64 skp = 0; kread(&skp, 8, (const void *)skops); const void *sk = (const void *)skp; u32 s = 0;\n"
TP = ("struct bpf_sock *bs = skops->sk; struct tcp_sock *tp; u32 s = 0;\n"
      "if (!bs || !(tp = bpf_skc_to_tcp_sock(bs))) return 1;\n")
# name -> (body, how many of the thing it does)
VARIANTS = {
    "empty program": ("", 1),
    "bpf_probe_read_kernel (the daemon's kernel reads)": (
        SK + READ * 9 + USE, 10),
    "direct read through bpf_skc_to_tcp_sock (BTF)": (
        TP + DIRECT * 10 + USE, 10),
    "array lookup": ("u32 i = skops->local_port; u8 *v = array.lookup(&i); if (v && *v == 7) return 0;", 1),
    "LRU hash lookup, 48-byte key": (
        "struct key48 k = {}; k.e = skops->local_port; u8 *v = lru.lookup(&k);"
        "if (v && *v == 7) return 0;", 1),
    "hash lookup + atomic add, a key per CPU": (
        "struct key48 k = {}; k.c = bpf_get_smp_processor_id(); u64 one = 1, *v = hash.lookup(&k);"
        "if (!v) hash.insert(&k, &one); else __sync_fetch_and_add(v, 1);", 1),
    "hash lookup + atomic add, one key on every CPU": (
        "struct key48 k = {}; k.c = 1; u64 one = 1, *v = hash.lookup(&k);"
        "if (!v) hash.insert(&k, &one); else __sync_fetch_and_add(v, 1);", 1),
    "pid + comm + cgroup id": (
        "char c[16]; bpf_get_current_comm(c, 16); u64 p = bpf_get_current_pid_tgid();"
        "u64 g = bpf_get_current_cgroup_id(); if (p + g + c[0] == 3) return 0;", 1),
    "bpf_sock_ops_cb_flags_set": ("bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags);", 1),
}


def ns_per_run(body: str, root: Path, wl: run.Workload, seconds: float) -> tuple[float, float]:
    """(ns per run, runs per connection) of a program with `body`, attached alone."""
    from bcc import BPF

    bpf = BPF(text=(HEAD + "int prog(struct bpf_sock_ops *skops) {\n" + body + "\nreturn 1; }\n").encode())
    link = link_cgroup(bpf.load_func(b"prog", BPF.SOCK_OPS).fd, root, BPF_CGROUP_SOCK_OPS)
    try:
        before = observers.bpf_programs()
        ids = [i for i, p in before.items() if p.get("name") == "prog"]
        conns = wl.run("plain", seconds, rate=2000, workers=2)["conns"]
        after = observers.bpf_programs()
        runs = sum(after[i]["run_cnt"] - before[i].get("run_cnt", 0) for i in ids)
        ns = sum(after[i]["run_time_ns"] - before[i].get("run_time_ns", 0) for i in ids)
        return ns / max(runs, 1), runs / max(conns, 1)
    finally:
        os.close(link)
        bpf.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    root, why = host_cgroup2_root()
    if root is None:
        sys.exit(f"primitives: {why}")
    with run.bpf_stats(), run.workload("c") as wl:
        measured = {name: ns_per_run(body, root, wl, args.seconds) for name, (body, _) in VARIANTS.items()}
    empty = measured["empty program"][0]
    print(f"| Work in a sock_ops callback | ns per run | ns each, above the empty program "
          f"({measured['empty program'][1]:.1f} runs per plain connection) |\n|---|---|---|")
    for name, (ns, _) in measured.items():
        each = (ns - empty) / VARIANTS[name][1] if name != "empty program" else ns
        print(f"| {name} | {ns:.0f} | {each:.0f} |")


if __name__ == "__main__":
    main()
