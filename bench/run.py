"""`make bench`: what tfowatch costs the host, side by side with the alternatives.

    bench/run.py [--reps N] [--seconds S] [--rate R] [--load python|c] [--soak S] [--scrapes N] [--quick]
                 [--soak-only]
                 [--json FILE] [--doc]

In namespaces of its own (a client and a server joined by a veth pair) it measures, with
every condition interleaved in each repetition (none, tfowatch, tfowatch in the tracepoint
tier, bpftrace, counters only, and empty programs on the sockops hooks: the floor):
connection rate at saturation (TFO and plain TCP), CPU and BPF run time per 1k connections at
a fixed rate (BPF also for plain connections), tfowatch's startup, RSS and exactness (drift
against TcpExt, events lost); then scrape latency at 1k and 10k series, tfowatch's memory over
a 10-minute run at saturation (--soak), and the aggregator's capacity with synthetic events.
The JSON goes to --json; --doc also rewrites docs/PERFORMANCE.md from every
bench/results/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]
import observers  # noqa: E402
import report  # noqa: E402
import synthetic  # noqa: E402
from netlab import Host, Lab  # noqa: E402

LOAD = BENCH / "load.py"
LOADGEN = BENCH / "loadgen.c"  # the same server and client in C (--load c)
PORT = 9000
# tfowatch as auto plans it, and in the tracepoint tier (the one auto picked on kernels without
# kprobes before the sockops tier): their costs side by side in one run (observers.CONDITIONS).
CONDITIONS = tuple(observers.CONDITIONS)
WORKLOADS = ("tfo", "plain")
T = TypeVar("T")


def ab_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The arguments every A/B run (bench/*_ab.py) takes: checkouts, and repetitions."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("versions", nargs="+", help="NAME=PATH: a checkout to run the daemon from")
    p.add_argument("--reps", type=int, default=reps)
    return p


def checkouts(parser: argparse.ArgumentParser, versions: list[str]) -> list[tuple[str, str]]:
    """The NAME=PATH arguments of an A/B run: each PATH a checkout whose tfowatch package the
    daemon is run from (PYTHONPATH)."""
    pairs = [tuple(v.split("=", 1)) for v in versions]
    if any(len(v) != 2 or not Path(v[-1], "tfowatch").is_dir() for v in pairs):
        parser.error("each version is NAME=PATH, PATH a checkout (it holds tfowatch/)")
    return [(name, path) for name, path in pairs]


def rotated(items: Sequence[T], rep: int) -> list[T]:
    """items in the order of repetition `rep`: each starts one later than in the one before."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled for the run: programs' run time, as bpftool shows it."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(old)


SERVER_START_S = 30.0


def load_command(load: str, scratch: Path) -> list[str]:
    """How to run the load server and client: bench/load.py, or bench/loadgen.c built now."""
    if load == "python":
        return [sys.executable, str(LOAD)]
    return [str(loadgen(scratch))]


def loadgen(scratch: Path) -> Path:
    """bench/loadgen.c, built once per run with the system's cc."""
    exe = scratch / "loadgen"
    if not exe.exists():
        subprocess.run(["cc", "-O2", "-o", str(exe), str(LOADGEN)], check=True)
    return exe


def getppid_ns(scratch: Path) -> float:
    """One syscall that tfowatch never looks at, timed beside the condition: what tracing a
    syscall costs every other syscall of the host."""
    out = subprocess.run([str(loadgen(scratch)), "syscall", "2000000"], capture_output=True,
                         text=True, check=True)
    return float(json.loads(out.stdout)["getppid_ns"])


class Workload:
    """The load server in its namespace, and client runs against it."""

    def __init__(self, lab: Lab, workers: int, load: list[str] | None = None) -> None:
        self.lab = lab
        self.workers = workers
        self.load = load or [sys.executable, str(LOAD)]
        self.srv, self.addr = lab.server("s", "3")
        self.server = self._start_server()

    def _start_server(self) -> subprocess.Popen[bytes]:
        """The server's workers, each ready; one that is not within SERVER_START_S is ended
        with its whole session (its forks hold our pipe) and named in the error."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.srv.name, *self.load,
                                 "server", str(PORT), str(self.workers)],
                                stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        assert proc.stdout is not None
        said = b""
        deadline = time.monotonic() + SERVER_START_S
        while said.count(b"ready") < self.workers and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                said += chunk
        if said.count(b"ready") == self.workers:
            return proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise RuntimeError(f"load server did not start in {SERVER_START_S:.0f} s "
                           f"(exit {proc.returncode}, said {said!r}; its errors are above)")

    def close(self) -> None:
        """The server's workers are forks in its own session: end them all."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGTERM)
        self.server.wait(timeout=10)

    def _client(self, *args: str, seconds: float = 0.0) -> dict[str, Any]:
        load = self.load if args[0] == "client" else [sys.executable, str(LOAD)]  # spray: Python's
        cmd = ["ip", "netns", "exec", self.lab.client.name, *load, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 600)
        return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    def run(self, workload: str, seconds: float, rate: float = 0.0, workers: int = 0) -> dict[str, Any]:
        args = ["client", self.addr, str(PORT), str(workers or self.workers), str(seconds)]
        args += ["--plain"] * (workload == "plain") + (["--rate", str(rate)] if rate else [])
        res = self._client(*args, seconds=seconds)
        res["rate"] = res["conns"] / seconds
        return res

    def spray(self, first: int, count: int) -> None:
        self._client("spray", self.addr, str(first), str(count))


@contextmanager
def workload(load: str, scratch: Path | None = None) -> Iterator[Workload]:
    """A load server (`load`: python or c) in a lab of its own, for what measures beside it;
    its processes and namespaces go on the way out, however it is left. scratch: where
    bench/loadgen.c is built (default: a directory of its own, gone with the lab)."""
    lab = Lab()
    wl = None
    try:
        with tempfile.TemporaryDirectory(prefix="tfowatch-bench-") as tmp:
            wl = Workload(lab, workers=2, load=load_command(load, scratch or Path(tmp)))
            yield wl
    finally:
        if wl is not None:
            wl.close()
        lab.close()


class Ticker:
    """Calls tick() every `every` seconds in a thread (the scraper of a scraped observer)."""

    def __init__(self, tick: Callable[[], None], every: float = 1.0) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(tick, every), daemon=True)
        self._thread.start()

    def _loop(self, tick: Callable[[], None], every: float) -> None:
        while not self._stop.wait(every):
            tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def tcpext(host: Host, name: str) -> int:
    return host.tcpext().get(name, 0)


def exactness(obs: observers.Tfowatch, srv: Host, passive0: int, emitted0: float) -> dict[str, Any]:
    """After a saturation run: drift, events lost, and the accepted SYN data as tfowatch and
    as the server namespace's TCPFastOpenPassive count it."""
    _, s = obs.scrape()
    drift = [v for (n, _), v in s.items() if n == "tfowatch_reconcile_drift"]
    accepted = sum(v for (n, lab), v in s.items() if n == "tfowatch_syn_data_accepted_total"
                   and ("netns", str(srv.inode)) in lab)
    return {"max_abs_drift": max((abs(v) for v in drift), default=0.0), "drift_series": len(drift),
            "events_lost": observers.total(s, "tfowatch_events_lost_total"),
            "events_emitted": observers.total(s, "tfowatch_events_total") - emitted0,
            "syn_data_accepted_tfowatch": accepted,
            "syn_data_accepted_kernel": tcpext(srv, "TCPFastOpenPassive") - passive0}


def per_connection(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                   conns: int) -> dict[str, dict[str, float]]:
    """Per program, between two bpf_stats readings: runs and run time (µs, which is ms per
    1k connections) per connection."""
    out = {}
    for name, (runs, ns) in after.items():
        runs0, ns0 = before.get(name, (0, 0))
        out[name] = {"runs": (runs - runs0) / conns, "us": (ns - ns0) / 1000 / conns}
    return out


def one_condition(name: str, wl: Workload, tier: str, args: argparse.Namespace,
                  scratch: Path) -> dict[str, Any]:
    obs = observers.make(name, tier, scratch)
    obs.start()
    passive0 = tcpext(wl.srv, "TCPFastOpenPassive")
    emitted0 = 0.0
    if isinstance(obs, observers.Tfowatch):
        emitted0 = observers.total(obs.scrape()[1], "tfowatch_events_total")
    ticker = Ticker(obs.tick)
    try:
        row: dict[str, Any] = {"startup_s": obs.startup_s, "bpf_programs": len(obs.programs),
                               "getppid_ns": getppid_ns(scratch)}
        t0 = time.monotonic()
        for workload in WORKLOADS:
            row[f"{workload}_rate"] = wl.run(workload, args.seconds)["rate"]
        row["saturation_s"] = time.monotonic() - t0
        cpu0, use0 = obs.cpu_s(), obs.bpf_usage()
        fixed = wl.run("tfo", args.seconds, rate=args.rate, workers=2)
        k = fixed["conns"] / 1000
        row["programs_tfo"] = per_connection(use0, use1 := obs.bpf_usage(), fixed["conns"])
        row.update(fixed_conns=fixed["conns"], cpu_ms_per_1k=(obs.cpu_s() - cpu0) * 1000 / k,
                   bpf_ms_per_1k=sum(p["us"] for p in row["programs_tfo"].values()))
        # what a connection that never tries TFO costs in the kernel
        plain = wl.run("plain", args.seconds, rate=args.rate, workers=2)
        row["programs_plain"] = per_connection(use1, obs.bpf_usage(), plain["conns"])
        row["bpf_ms_per_1k_plain"] = sum(p["us"] for p in row["programs_plain"].values())
        if isinstance(obs, observers.Tfowatch):
            row["rss_bytes"] = obs.rss_bytes()
            row["rss_anon_bytes"], row["rss_file_bytes"] = obs.rss_split()
            if obs.name == "tfowatch":
                row["exactness"] = exactness(obs, wl.srv, passive0, emitted0)
        return row
    finally:
        ticker.stop()
        obs.stop()


def overhead(wl: Workload, tier: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = tuple(rotated(CONDITIONS, rep))
        rows = {name: one_condition(name, wl, tier, args, scratch) for name in order}
        reps.append({"order": list(order), "rows": rows})
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {rows[n]['tfo_rate']:.0f}/s" for n in CONDITIONS), file=sys.stderr, flush=True)
    return {"reps": reps, "summary": summarise(reps)}


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and spread per condition; ratios paired within a repetition (same minute,
    same machine state), then their median."""
    out: dict[str, Any] = {}
    for name in CONDITIONS:
        rows = [r["rows"][name] for r in reps]
        cond: dict[str, Any] = {}
        for workload in WORKLOADS:
            key = f"{workload}_rate"
            cond[key] = spread([r[key] for r in rows])
            cond[f"{workload}_ratio"] = spread([r[key] / b["rows"]["none"][key]
                                                for r, b in zip(rows, reps, strict=True)])
        for key in ("cpu_ms_per_1k", "bpf_ms_per_1k", "bpf_ms_per_1k_plain", "startup_s", "getppid_ns"):
            cond[key] = spread([r[key] for r in rows])
        for key in ("rss_bytes", "rss_anon_bytes", "rss_file_bytes"):
            if key in rows[0]:
                cond[key] = spread([r[key] for r in rows])
        cond["programs"] = {w: {prog: {k: spread([r[f"programs_{w}"].get(prog, {k: 0.0})[k] for r in rows])
                                       for k in ("runs", "us")}
                                for prog in rows[0][f"programs_{w}"]}
                            for w in WORKLOADS}
        out[name] = cond
    ex = [r["rows"]["tfowatch"]["exactness"] for r in reps]
    out["tfowatch"]["exactness"] = {
        "max_abs_drift": max(e["max_abs_drift"] for e in ex),
        "events_lost": sum(e["events_lost"] for e in ex),
        "events_per_s": spread([e["events_emitted"] / r["rows"]["tfowatch"]["saturation_s"]
                                for e, r in zip(ex, reps, strict=True)]),
        "accepted_equal": all(e["syn_data_accepted_tfowatch"] == e["syn_data_accepted_kernel"]
                              for e in ex),
    }
    return out


STORM_CLIENTS = 20
# A scrape storm: STORM_CLIENTS threads in a process of their own, each scraping in a loop
# until stdin closes; it prints how many scrapes were answered.
STORM = """
import sys, threading, urllib.request
done, stop = [0], threading.Event()
def loop():
    while not stop.is_set():
        try:
            urllib.request.urlopen(sys.argv[1], timeout=30).read()
            done[0] += 1
        except OSError:
            pass
threads = [threading.Thread(target=loop, daemon=True) for _ in range(int(sys.argv[2]))]
[t.start() for t in threads]
sys.stdin.read()
stop.set()
[t.join() for t in threads]
print(done[0])
"""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank), and the spread, of scrape times."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(0.99 * len(ordered)) - 1))
    return {**spread(values), "p50": statistics.median(ordered), "p99": ordered[rank]}


def timed_scrapes(obs: observers.Tfowatch, scrapes: int, gzip: bool = False) -> list[float]:
    return [obs.scrape(gzip=gzip)[0] for _ in range(scrapes)]


PART = "tfowatch_scrape_collector_duration_seconds"
BUILD = "tfowatch_scrape_duration_seconds"


def where_a_scrape_goes(obs: observers.Tfowatch, scrapes: int) -> dict[str, Any]:
    """Where the time of a plain scrape goes, from the daemon's own self-metrics of each of
    `scrapes` scrapes: each part of its state (probes: the perf buffers, the counts map and
    the aggregator's snapshot; kernel: every namespace's TcpExt; self), the whole answer's
    build (the state, the text and any gzip: its histogram), and the rest of the client's
    time (HTTP, and reading the answer). Medians, in seconds."""
    client, build, parts = [], [], {}  # type: ignore[var-annotated]
    _, last = obs.scrape()
    for _ in range(scrapes):
        took, samples = obs.scrape()
        client.append(took)
        build.append((samples[(f"{BUILD}_sum", frozenset())] - last[(f"{BUILD}_sum", frozenset())])
                     / (samples[(f"{BUILD}_count", frozenset())] - last[(f"{BUILD}_count", frozenset())]))
        for (name, labels), value in samples.items():
            if name == PART:
                parts.setdefault(dict(labels)["collector"], []).append(value)
        last = samples
    out = {f"{name}_s": statistics.median(values) for name, values in parts.items()}
    out["build_s"] = statistics.median(build)
    out["render_s"] = out["build_s"] - sum(statistics.median(v) for v in parts.values())
    out["client_s"] = statistics.median(client)
    out["http_s"] = out["client_s"] - out["build_s"]
    return out


def under_storm(obs: observers.Tfowatch, scrapes: int) -> dict[str, Any]:
    """Scrape times while STORM_CLIENTS other clients scrape flat out (the storm's own scrapes
    per second beside them)."""
    storm = subprocess.Popen([sys.executable, "-c", STORM, obs.url, str(STORM_CLIENTS)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # every storm thread has connected
        t0 = time.monotonic()
        times = timed_scrapes(obs, scrapes, gzip=True)
        elapsed = time.monotonic() - t0
    finally:
        out, _ = storm.communicate("", timeout=60)
    return {"scrape_s": percentiles(times), "clients": STORM_CLIENTS,
            "storm_scrapes_per_s": int(out.strip() or 0) / (elapsed + 1.0)}


def scrape_latency(wl: Workload, series_points: list[int], scrapes: int) -> list[dict[str, Any]]:
    """tfowatch with room for every series; SYN data to N distinct closed ports makes N
    label sets in tfowatch_syn_data_sent_total; scrapes timed from the client side, plain and
    gzip (as Prometheus asks), and gzip while a storm of other clients scrapes."""
    obs = observers.Tfowatch(series_cap=2 * max(series_points))
    obs.start()
    out = []
    try:
        sprayed = 0
        for n in series_points:
            wl.spray(20000 + sprayed, n - sprayed)
            sprayed = n
            _, samples = obs.scrape()  # the first scrape after the spray drains the buffer
            out.append({"target_series": n, "series": observers.total(samples, "tfowatch_series"),
                        "samples": len(samples), "scrape_s": percentiles(timed_scrapes(obs, scrapes)),
                        "gzip_scrape_s": percentiles(timed_scrapes(obs, scrapes, gzip=True)),
                        "storm": under_storm(obs, scrapes), "inside": where_a_scrape_goes(obs, 20)})
    finally:
        obs.stop()
    return out


def soak(wl: Workload, seconds: float) -> dict[str, Any]:
    """tfowatch beside TFO connections at saturation for `seconds`, scraped every second: its
    anonymous RSS sampled 20 times over the run, and its exactness at the end."""
    obs = observers.Tfowatch()
    obs.start()
    passive0 = tcpext(wl.srv, "TCPFastOpenPassive")
    emitted0 = observers.total(obs.scrape()[1], "tfowatch_events_total")
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()
    sampler = Ticker(lambda: rss.append((time.monotonic() - t0, obs.rss_split()[0])), every=seconds / 20)
    ticker = Ticker(obs.tick)
    try:
        res = wl.run("tfo", seconds)
    finally:
        sampler.stop()
        ticker.stop()
    try:
        return {"seconds": seconds, "rate": res["rate"], "rss_anon": rss,
                "exactness": exactness(obs, wl.srv, passive0, emitted0)}
    finally:
        obs.stop()


def environment(tier: str) -> dict[str, Any]:
    def version(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "missing"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return {"kernel": platform.release(), "tier": tier, "cpu": cpu, "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "bpftrace": version("bpftrace", "--version"),
            "bcc": version("dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc"),
            "virtualised": version("systemd-detect-virt") if Path("/usr/bin/systemd-detect-virt").exists()
            else "unknown"}


def planned_tier() -> str:
    out = subprocess.run([str(observers.TFOWATCH), "probes", "--json"], capture_output=True,
                         text=True, check=True)
    return str(json.loads(out.stdout)["tier"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement (default 8)")
    p.add_argument("--rate", type=float, default=2000.0, help="fixed rate, connections/s (default 2000)")
    p.add_argument("--workers", type=int, default=4, help="client processes at saturation (default 4)")
    p.add_argument("--series", default="1000,10000", help="series counts for scrape latency")
    p.add_argument("--scrapes", type=int, default=200,
                   help="timed scrapes per series count, each way (default 200)")
    p.add_argument("--soak", type=float, default=600.0,
                   help="seconds of tfowatch at saturation, its memory sampled (default 600; 0: none)")
    p.add_argument("--load", choices=("python", "c"), default="python",
                   help="load generator: bench/load.py, or bench/loadgen.c (default python)")
    p.add_argument("--quick", action="store_true", help="one short repetition: the smoke test's run")
    p.add_argument("--soak-only", action="store_true",
                   help="only the soak: tfowatch's memory over --soak seconds at saturation (its JSON "
                        "is not a results file for docs/PERFORMANCE.md)")
    p.add_argument("--label", default="", help="results name (default: host or the kernel)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--doc", action="store_true", help="also rewrite docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.seconds, args.rate, args.series, args.soak = 1, 1.0, 500.0, "200,1000", 4.0
        args.scrapes = 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped by a signal: unwind, so namespaces and processes are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tier = planned_tier()
    started = time.time()
    with (bpf_stats(), tempfile.TemporaryDirectory(prefix="tfowatch-bench-") as tmp,
          workload(args.load, Path(tmp)) as wl):
        wl.workers = args.workers
        result: dict[str, Any] = {
            "label": args.label or f"{tier} tier, {platform.release()}",
            "command": "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "environment": environment(tier),
            "settings": {k: str(v) for k, v in vars(args).items()},
        }
        if not args.soak_only:
            result["overhead"] = overhead(wl, tier, args, Path(tmp))
            result["scrape"] = scrape_latency(wl, [int(n) for n in args.series.split(",")],
                                              scrapes=args.scrapes)
        if args.soak:
            result["soak"] = soak(wl, args.soak)
    if not args.soak_only:
        result["aggregator"] = aggregator(args)
    result["duration_s"] = time.time() - started
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    if args.doc:
        report.write()
    return 0


def aggregator(args: argparse.Namespace) -> dict[str, Any]:
    rates = [50e3, 100e3] if args.quick else [50e3, 75e3, 100e3, 125e3, 150e3, 200e3, 250e3, 300e3]
    step_s = 0.5 if args.quick else 2.0
    return {"decode_rate": synthetic.decode_rate(50_000 if args.quick else 500_000),
            "perf": synthetic.perf_ladder(256, step_s, rates),
            "perf_wakeup_per_event": synthetic.perf_ladder(256, step_s, rates, wakeup_events=1)}


if __name__ == "__main__":
    sys.exit(main())
