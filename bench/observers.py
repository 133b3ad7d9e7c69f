"""What runs beside the workload while it is measured: nothing, tfowatch (its planned tier, the
tracepoint tier or the counters tier), the bpftrace equivalent, or empty programs on the
sockops tier's hooks (bench/floor.py). Each reports its own CPU time, RSS and the
kernel run time of the BPF programs it loaded (kernel.bpf_stats_enabled)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
TFOWATCH = BENCH.parent / ".venv" / "bin" / "tfowatch"
START_TIMEOUT_S = 300  # BCC and bpftrace compile for ~1 min each under emulation (VM lab)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# Every condition bench/run.py measures, in its order, with its label in the tables ({tier}:
# the tier this kernel plans).
CONDITIONS = {
    "none": "nothing",
    "tfowatch": "tfowatch ({tier} tier)",
    "tracepoint": "tfowatch, tracepoint tier",
    "bpftrace": "bpftrace equivalent",
    "counters": "tfowatch, TcpExt counters only",
    "floor": "empty programs on the sockops tier's hooks (the floor)",
}


def bpf_programs() -> dict[int, dict[str, Any]]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True)
    return {p["id"]: p for p in json.loads(out.stdout or "[]")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class Observer:
    name = "none"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.programs: set[int] = set()
        self._before: set[int] = set()
        self.startup_s = 0.0

    def start(self) -> None:
        self._before = set(bpf_programs())
        t0 = time.monotonic()
        try:
            self._launch()
        except BaseException:
            self.stop()  # a process that did not come up must not stay behind
            raise
        self.startup_s = time.monotonic() - t0
        self.programs = set(bpf_programs()) - self._before

    def _launch(self) -> None:
        pass

    def tick(self) -> None:
        """Once a second while the workload runs: what a scraper would do."""

    def cpu_s(self) -> float:
        if self.proc is None:
            return 0.0
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def rss_bytes(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss if self.proc else 0

    def rss_split(self) -> tuple[int, int]:
        """(anonymous, file-backed) resident bytes: the daemon's own memory, and the mapped
        libraries (libbcc's LLVM most of all), clean and shared with any other BCC tool."""
        if self.proc is None:
            return 0, 0
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        status = dict(line.split(":", 1) for line in lines)
        anon, file = (int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
        return anon, file

    def bpf_usage(self) -> dict[str, tuple[int, int]]:
        """Program name -> (runs, run time in ns) so far, of the programs this observer loaded."""
        progs = bpf_programs()
        usage: dict[str, tuple[int, int]] = {}
        for i in self.programs & set(progs):
            name = progs[i].get("name", str(i))
            runs, ns = usage.get(name, (0, 0))
            usage[name] = (runs + int(progs[i].get("run_cnt", 0)), ns + int(progs[i].get("run_time_ns", 0)))
        return usage

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _died(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode().strip() if self.proc.stderr else ""
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {err}")


class Tfowatch(Observer):
    def __init__(self, mode: str = "auto", series_cap: int = 1000) -> None:
        super().__init__()
        self.name = "tfowatch" if mode == "auto" else f"tfowatch-{mode}"
        self.args = ["--mode", mode, "--series-cap", str(series_cap), "--log-level", "WARNING"]
        self.url = f"http://127.0.0.1:{free_port()}/metrics"

    def _launch(self) -> None:
        listen = self.url.split("/")[2]
        self.proc = subprocess.Popen([str(TFOWATCH), "run", "--listen", listen, *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._died()
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not serve in {START_TIMEOUT_S} s")

    def scrape(self, gzip: bool = False) -> tuple[float, Samples]:
        """(seconds the scrape took, its samples); gzip: asked for as Prometheus asks, the
        time including the client's decompression."""
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "gzip"} if gzip else {})
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
            if answer.headers.get("Content-Encoding") == "gzip":
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif gzip:
                raise RuntimeError("asked for gzip, got an uncompressed answer")
        return time.perf_counter() - t0, parse(body.decode())

    def tick(self) -> None:
        self.scrape()


BPFTRACE_OF = {"sockops": "tracepoint"}


class Bpftrace(Observer):
    name = "bpftrace"

    def __init__(self, tier: str, out: Path) -> None:
        super().__init__()
        # bpftrace cannot load a sock_ops program: beside the sockops tier its nearest
        # equivalent on a kernel without kprobes is the tracepoint one
        self.script = BENCH / "bpftrace" / f"{BPFTRACE_OF.get(tier, tier)}.bt"
        self.out = out

    def _launch(self) -> None:
        self.out.write_text("")
        self.proc = subprocess.Popen(["bpftrace", "-o", str(self.out), str(self.script)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        # "Attaching N probes..." comes before the attach; the first once-a-second print
        # (an empty line while the maps are empty) comes after it.
        while self.out.read_text().count("\n") < 2:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"bpftrace exited {self.proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach in {START_TIMEOUT_S} s")
            time.sleep(0.05)


class Floor(Observer):
    name = "floor"

    def _launch(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "floor.py")], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        if not ready or self.proc.stdout.readline().strip() != b"attached":
            self._died()
            raise RuntimeError(f"floor did not attach in {START_TIMEOUT_S} s")


def make(name: str, tier: str, scratch: Path) -> Observer:
    if name == "tfowatch":
        return Tfowatch()
    if name in ("counters", "tracepoint"):
        return Tfowatch(mode=name)
    if name == "bpftrace":
        return Bpftrace(tier, scratch / "bpftrace.out")
    if name == "floor":
        return Floor()
    return Observer()
