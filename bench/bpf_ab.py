"""BPF run time per connection of two or more checkouts side by side, with the floor (empty
programs on the same hooks) beside them: bench/run.py's fixed-rate measurement (bpf_stats per
TFO connection and per plain one, the C load generator), in an order rotated per repetition.

    sudo .venv/bin/python bench/bpf_ab.py before=/tmp/old after=. [--reps 5] [--seconds 6]

Each NAME=PATH runs the daemon with PYTHONPATH=PATH (a `git worktree` of the commit before a
change, say), so only the tfowatch package differs between them. Prints one JSON line per
measurement, then a Markdown table of medians (min-max).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import observers
import run

FLOOR = "floor"


def measure(wl: run.Workload, obs: observers.Observer, seconds: float, rate: float) -> dict[str, float]:
    """µs of BPF run time, and program runs, per TFO and per plain connection."""
    obs.start()
    try:
        out = {}
        for workload in run.WORKLOADS:
            before = obs.bpf_usage()
            conns = wl.run(workload, seconds, rate=rate, workers=2)["conns"]
            progs = run.per_connection(before, obs.bpf_usage(), conns)
            out[f"{workload}_us"] = sum(p["us"] for p in progs.values())
            out[f"{workload}_runs"] = sum(p["runs"] for p in progs.values())
        return out
    finally:
        obs.stop()


def table(rows: list[dict[str, Any]], names: list[str]) -> str:
    keys = [f"{w}_{k}" for w in run.WORKLOADS for k in ("us", "runs")]
    lines = ["| condition | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name in names:
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if r["name"] == name]
            cells.append(f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = run.ab_parser(__doc__, reps=5)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rate", type=float, default=2000.0)
    args = p.parse_args()
    versions = run.checkouts(p, args.versions)
    conditions = [*versions, (FLOOR, "")]
    rows = []
    with run.bpf_stats(), run.workload("c") as wl:
        for rep in range(args.reps):
            for name, path in run.rotated(conditions, rep):
                if name == FLOOR:
                    obs: observers.Observer = observers.Floor()
                else:
                    os.environ["PYTHONPATH"] = str(Path(path).resolve())
                    obs = observers.Tfowatch()
                rows.append({"rep": rep, "name": name, **measure(wl, obs, args.seconds, args.rate)})
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows, [name for name, _ in conditions]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
