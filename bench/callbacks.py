"""Where a connection's BPF time goes in the sockops tier: each sock_ops callback's runs and
cost per TFO connection and per plain one, with tfowatch's own programs (built with
PROFILE_OPS, which times each callback around its dispatch), and the whole programs'
bpf_stats beside them.

    bench/callbacks.py [--seconds S] [--rate R] [--json FILE]

In namespaces of its own (bench/run.py's workload, the C load generator at a fixed rate).
The timing itself adds two clock reads to every run; the table subtracts what they cost
(timed alone in the same runs), so a callback that does nothing shows ~0. Prints Markdown.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]
import observers  # noqa: E402
import run  # noqa: E402

from tfowatch.core.pipeline import Pipeline  # noqa: E402
from tfowatch.core.plan import Variant  # noqa: E402

# enum bpf_sock_ops_op (include/uapi/linux/bpf.h)
OPS = ["VOID", "TIMEOUT_INIT", "RWND_INIT", "TCP_CONNECT_CB", "ACTIVE_ESTABLISHED_CB",
       "PASSIVE_ESTABLISHED_CB", "NEEDS_ECN", "BASE_RTT", "RTO_CB", "RETRANS_CB", "STATE_CB",
       "TCP_LISTEN_CB", "RTT_CB", "PARSE_HDR_OPT_CB", "HDR_OPT_LEN_CB", "WRITE_HDR_OPT_CB",
       "TSTAMP_SCHED_CB", "TSTAMP_SND_SW_CB", "TSTAMP_SND_HW_CB", "TSTAMP_ACK_CB",
       "TSTAMP_SENDMSG_CB"]
SLOTS = 64
CLOCK = SLOTS - 1  # two clock reads alone


def op_costs(bpf: Any) -> dict[int, tuple[int, int]]:
    """slot -> (runs, ns), summed over CPUs."""
    table = bpf[b"op_costs"]
    out = {}
    for slot in range(SLOTS):
        per_cpu = table[ctypes.c_int(slot)]
        out[slot] = (sum(c.runs for c in per_cpu), sum(c.ns for c in per_cpu))
    return out


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind this process's fd."""
    info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return int(next(line.split()[1] for line in info.splitlines() if line.startswith("prog_id:")))


def measure(pipe: Pipeline, wl: run.Workload, workload: str, seconds: float, rate: float) -> dict[str, Any]:
    assert pipe.probes is not None
    bpf = pipe.probes.bpf
    ids = {prog_id(bpf.funcs[b"on_sock_ops"].fd)}
    stats0, costs0 = observers.bpf_programs(), op_costs(bpf)
    conns = wl.run(workload, seconds, rate=rate, workers=2)["conns"]
    stats1, costs1 = observers.bpf_programs(), op_costs(bpf)
    delta = {s: (costs1[s][0] - costs0[s][0], costs1[s][1] - costs0[s][1]) for s in costs1}
    clock_runs, clock_ns = delta[CLOCK]
    clock = clock_ns / max(clock_runs, 1)
    ops = {}
    for slot, (runs, ns) in delta.items():
        if slot == CLOCK or not runs:
            continue
        each = ns / runs - clock
        ops[OPS[slot] if slot < len(OPS) else str(slot)] = {
            "runs": runs / conns, "ns_per_run": each, "ns_per_conn": each * runs / conns}
    runs = sum(stats1[i]["run_cnt"] - stats0[i].get("run_cnt", 0) for i in ids)
    ns = sum(stats1[i]["run_time_ns"] - stats0[i].get("run_time_ns", 0) for i in ids)
    return {"conns": conns, "clock_ns": clock, "ops": ops,
            "bpf_stats": {"runs": runs / conns, "ns_per_conn": ns / conns}}


def table(results: dict[str, dict[str, Any]]) -> str:
    names = sorted({op for r in results.values() for op in r["ops"]}, key=OPS.index)
    lines = ["| callback | " + " | ".join(f"{w}: runs / ns per run / ns per conn" for w in results) + " |",
             "|---|" + "---|" * len(results)]
    for op in names:
        cells = []
        for r in results.values():
            o = r["ops"].get(op)
            cells.append(f"{o['runs']:.2f} / {o['ns_per_run']:.0f} / {o['ns_per_conn']:.0f}" if o else "-")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    timed = [(sum(o["runs"] for o in r["ops"].values()), sum(o["ns_per_conn"] for o in r["ops"].values()))
             for r in results.values()]
    lines.append("| all callbacks, timed | "
                 + " | ".join(f"{runs:.2f} / - / {ns:.0f}" for runs, ns in timed) + " |")
    stats = [r["bpf_stats"] for r in results.values()]
    lines.append("| on_sock_ops by bpf_stats (timing included) | " + " | ".join(
        f"{s['runs']:.2f} / - / {s['ns_per_conn']:.0f}" for s in stats) + " |")
    lines.append("")
    lines.append("Two clock reads (subtracted from each run above): " + ", ".join(
        f"{w} {r['clock_ns']:.0f} ns" for w, r in results.items()))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with run.bpf_stats(), run.workload("c") as wl:
        pipe = Pipeline(mode="sockops", variant=Variant(in_kernel_counts=True, profile_ops=True))
        try:
            results = {w: measure(pipe, wl, w, args.seconds, args.rate) for w in run.WORKLOADS}
            drift = pipe.state().drift
        finally:
            pipe.close()
    print(table(results))
    off = {f"{ns} {name}": v for (ns, name), v in drift.items() if v}
    print(f"\nDrift after the runs (probes minus the kernel's counters): {off or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"workloads": results, "drift": off}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
