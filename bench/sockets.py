"""What `doctor` (no watch) and one `top` interval's socket tables cost on a namespace that
ran out of ports: N TIME-WAIT sockets to two destinations and L listeners (issue 20).

    sudo .venv/bin/python bench/sockets.py [--time-wait 100000] [--listeners 1000] [--json F]

Run it with PYTHONPATH at another checkout to measure that one (before/after). The truth for
the TIME-WAIT counts is `ss -Htan state time-wait` in the namespace, read beside doctor. Every
measurement runs within the first TIME-WAIT socket's 60 s, so none has expired meanwhile.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

NS = "tfw-bench-socks"
# Many destination ports: with tcp_tw_reuse=0 each connect() searches past the ports its
# destination holds in TIME-WAIT, so 2 destinations x 50k took 63 s (sockets expired meanwhile).
DEST_PORTS = tuple(range(9001, 9051))
FIRST_LISTENER = 20000
ENTER = ["ip", "netns", "exec", NS]


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


# Run inside the namespace by a child python: makes the TIME-WAIT sockets (the client closes
# first, tcp_tw_reuse=0 so none is taken over), then holds the listeners until stdin closes.
MAKER = r"""
import resource, socket, sys
n, listeners, first, ports = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
resource.setrlimit(resource.RLIMIT_NOFILE, (listeners + 64, listeners + 64))
servers = []
for p in ports:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(p))); s.listen(4096); servers.append(s)
for i in range(n):
    srv = servers[i % len(servers)]
    c = socket.create_connection(srv.getsockname()); a, _ = srv.accept(); c.close(); a.close()
held = []
for p in range(first, first + listeners):
    s = socket.socket(); s.bind(("127.0.0.2", p)); s.listen(16); held.append(s)  # TIME-WAIT holds .1's ports
print("ready", flush=True)
sys.stdin.read()
"""


def setup(time_wait: int, listeners: int) -> subprocess.Popen[str]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    for key, value in (("tcp_max_tw_buckets", str(2 * time_wait)), ("tcp_tw_reuse", "0"),
                       ("ip_local_port_range", "1024 65535")):
        sh(*ENTER, "sysctl", "-qw", f"net.ipv4.{key}={value}")
    maker = subprocess.Popen([*ENTER, sys.executable, "-c", MAKER, str(time_wait), str(listeners),
                              str(FIRST_LISTENER), *map(str, DEST_PORTS)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert maker.stdout is not None and maker.stdout.readline().strip() == "ready"
    print(f"made {time_wait} TIME-WAIT sockets and {listeners} listeners", file=sys.stderr)
    return maker


def ss_time_wait() -> Counter[tuple[str, int]]:
    out = sh(*ENTER, "ss", "-Htan", "state", "time-wait")
    counts: Counter[tuple[str, int]] = Counter()
    for line in out.splitlines():
        addr, port = line.split()[-1].rsplit(":", 1)
        counts[(addr, int(port))] += 1
    return counts


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode in (0, 3), res.stderr[-2000:]  # 3: doctor's findings
    out = res.stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, out


# One `top` interval's socket work (TopSession.refresh_listeners, every namespace on the host),
# in a fresh interpreter: its second interval, past the first one's imports.
TOP_INTERVAL = """
import time
from tfowatch.core import netns
from tfowatch.doctor import listeners
for _ in range(2):
    handles = netns.discover()
    t = time.perf_counter(); found = listeners.discover(handles=handles)
print(time.perf_counter() - t, len(found))
"""


def measure(time_wait: int, listeners: int) -> dict[str, Any]:
    maker = setup(time_wait, listeners)
    made = time.monotonic()
    try:
        truth = ss_time_wait()
        wall, cpu, out = timed([sys.executable, "-c", "import sys; from tfowatch.cli import main; "
                                "sys.exit(main())", "doctor", "--netns", NS, "-o", "json"])
        report = json.loads(out)
        after_truth = ss_time_wait()
        top_wall, top_cpu, top_out = timed([sys.executable, "-c", TOP_INTERVAL])
        top_s, top_listeners = top_out.split()
        expired = time.monotonic() - made > 55
        [ns] = [n for n in report["namespaces"] if n["name"] == NS]
        found = ns.get("time_wait_by_destination", {})  # older doctors: the total only
    finally:
        assert maker.stdin is not None
        maker.stdin.close()
        maker.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    return {
        "time_wait": sum(truth.values()), "listeners": listeners,
        "doctor_wall_s": round(wall, 3), "doctor_cpu_s": round(cpu, 3),
        "doctor_time_wait": ns.get("time_wait"), "ss_time_wait": sum(truth.values()),
        "ss_stable": truth == after_truth, "doctor_listeners": len(ns.get("listeners", [])),
        "top_interval_sockets_s": round(float(top_s), 3), "top_process_wall_s": round(top_wall, 3),
        "top_process_cpu_s": round(top_cpu, 3), "top_listeners": int(top_listeners),
        "an_expiry_may_have_happened": expired,
        "per_destination_ss": {f"{a}:{p}": n for (a, p), n in sorted(truth.items())},
        "per_destination_doctor": dict(sorted(found.items())),
        "per_destination_exact": found == {f"{a}:{p}": n for (a, p), n in truth.items()} if found else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-wait", type=int, default=100_000)
    p.add_argument("--listeners", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = measure(args.time_wait, args.listeners)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
