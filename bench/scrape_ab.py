"""Scrape latency of two or more checkouts side by side: bench/run.py's scrape measurement
(plain, gzip, gzip beside 20 scraping clients, and where a scrape's time goes) for each, in an
order rotated per repetition, in one run.

    sudo .venv/bin/python bench/scrape_ab.py before=/tmp/old after=. [--reps 2] [--series 10000]

Each NAME=PATH runs the daemon with PYTHONPATH=PATH (a `git worktree` of the commit before a
change, say), so only the tfowatch package differs between them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import run


def summary(name: str, res: dict[str, Any]) -> dict[str, Any]:
    def ms(p: dict[str, float]) -> str:
        return f"{p['p50'] * 1e3:.1f} / {p['p99'] * 1e3:.1f}"
    inside = res["inside"]
    return {"name": name, "plain p50/p99 ms": ms(res["scrape_s"]), "gzip": ms(res["gzip_scrape_s"]),
            "gzip beside 20 clients": ms(res["storm"]["scrape_s"]),
            "their scrapes/s": round(res["storm"]["storm_scrapes_per_s"]),
            "built ms": round(inside["build_s"] * 1e3, 1), "probes ms": round(inside["probes_s"] * 1e3, 1)}


def main() -> int:
    p = run.ab_parser(__doc__, reps=2)
    p.add_argument("--series", type=int, default=10000)
    p.add_argument("--scrapes", type=int, default=200)
    args = p.parse_args()
    versions = run.checkouts(p, args.versions)
    results = []
    with run.workload("python") as wl:
        for rep in range(args.reps):
            for name, path in run.rotated(versions, rep):
                os.environ["PYTHONPATH"] = str(Path(path).resolve())
                res = run.scrape_latency(wl, [args.series], args.scrapes)[0]
                results.append({"rep": rep, **summary(name, res)})
                print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
