"""Test hosts in network namespaces this test run creates (veth pairs), and their truth:
what the peers observed and the namespaces' own TcpExt counters. Everything created
is removed by close()."""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tfowatch.core import netns
from tfowatch.core.cgroups import cgroup2_mount

PEER = Path(__file__).with_name("peer.py")
# How long a BPF program may take to compile and attach: ~5 s here, ~1 min in a VM lab guest under
# software emulation, and several while the host tests run beside it (tests/vm/lab.py sets it).
BPF_START_S = float(os.environ.get("TFOWATCH_BPF_START_S", "120"))
# Set by tests/vm/lab.py in a kprobe guest, where every BCC compile costs minutes of emulation.
IN_GUEST = bool(os.environ.get("TFOWATCH_GUEST"))
TFOWATCH = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parents[1] / ".venv")) / "bin" / "tfowatch"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Host:
    def __init__(self, name: str) -> None:
        self.name = name
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        self.inode = netns.inode(f"/run/netns/{name}")

    @property
    def handle(self) -> str:
        """How tfowatch enters it (netns.discover()'s form for a named namespace)."""
        return f"/run/netns/{self.name}"

    def sysctl(self, key: str, value: str) -> None:
        sh("ip", "netns", "exec", self.name, "sysctl", "-q", "-w", f"{key}={value}")

    def tcpext(self) -> dict[str, int]:
        return netns.tcpext(self.handle)

    @contextmanager
    def dropping_synacks(self, sport: int) -> Iterator[None]:
        """Drop SYN-ACKs from remote port `sport` arriving here (an nft table of our own)."""
        table = f"tfw_drop_{sport}"
        rules = (f"table inet {table} {{\n chain input {{\n type filter hook input priority 0;\n"
                 f" tcp sport {sport} tcp flags & (syn | ack) == syn | ack drop\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules,
                       check=True, capture_output=True, text=True)
        try:
            yield
        finally:
            sh("ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", table)

    def _peer_cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, sys.executable, str(PEER), *args]

    def popen(self, *args: str, quiet: bool = False, stdin: int | None = None) -> subprocess.Popen[str]:
        """The peer in the background; `quiet` discards its output (a long-running load that
        would otherwise block on a full pipe); stdin=subprocess.PIPE to hold it (--hold)."""
        out = subprocess.DEVNULL if quiet else subprocess.PIPE
        return subprocess.Popen(self._peer_cmd(*args), stdin=stdin, stdout=out, stderr=out, text=True)

    def peer(self, *args: str, cgroup: Path | None = None) -> list[dict[str, object]]:
        """Run the peer to completion; inside `cgroup` (a v2 directory) when given."""
        cmd = self._peer_cmd(*args)
        if cgroup is not None:
            cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@dataclass
class Route:
    """A server reached through a router (Lab.routed_server)."""
    server: Host
    router: Host
    v4: str  # the server's addresses
    v6: str

    def middlebox(self, *rules: str) -> None:
        """The router's forward chain holds `rules` (nft syntax), in a table of our own that
        goes with the router's namespace."""
        body = "".join(f"  {r}\n" for r in rules)
        ruleset = (f"table inet tfw_mbox {{\n chain mbox {{\n  type filter hook forward priority 0;\n"
                   f"{body} }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.router.name, "nft", "-f", "-"], input=ruleset,
                       check=True, capture_output=True, text=True)

    def clear_middlebox(self) -> None:
        sh("ip", "netns", "exec", self.router.name, "nft", "delete", "table", "inet", "tfw_mbox")


class Lab:
    """A client namespace linked by veth pairs to server namespaces."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="tfowatch-lab-")
        self.client = self.host("c")
        self._subnet = 0
        root = cgroup2_mount()
        self.cgroup = root / f"tfw-lab-{self.tag}" if root else None
        if self.cgroup is not None:
            self.cgroup.mkdir()

    def host(self, role: str) -> Host:
        h = Host(f"tfw-{role}-{self.tag}")
        self.hosts.append(h)
        return h

    def link(self, a: Host, b: Host) -> tuple[str, str]:
        """A veth pair between two hosts; returns (address of a, address of b)."""
        self._subnet += 1
        ia, ib = f"ta{self._subnet}{self.tag}", f"tb{self._subnet}{self.tag}"
        sh("ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib, "netns", b.name)
        net = f"10.{231 + self._subnet // 250}.{self._subnet % 250}"  # never reused: a client caches
        # a TFO cookie per address, which another server would reject
        for host, dev, addr in ((a, ia, f"{net}.1"), (b, ib, f"{net}.2")):
            sh("ip", "-n", host.name, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", host.name, "link", "set", dev, "up")
        return f"{net}.1", f"{net}.2"

    def server(self, role: str, tcp_fastopen: str, host: Host | None = None) -> tuple[Host, str]:
        """A server namespace (`host`, or a new one) reachable from the client; returns it and
        its address."""
        srv = host or self.host(role)
        _, addr = self.link(self.client, srv)
        srv.sysctl("net.ipv4.tcp_fastopen", tcp_fastopen)
        return srv, addr

    @staticmethod
    def settle(seconds: float = 1.5) -> None:
        """Let namespaces deleted before (an earlier test's) finish going: the kernel frees them
        in the background, and a free landing between the making of a host and of its
        successor changes which inodes the successor gets (host_with_inode)."""
        time.sleep(seconds)

    def host_with_inode(self, ino: int, role: str, make: Callable[[str], Host] | None = None,
                        tries: int = 100) -> Host:
        """A new namespace that the kernel gave the inode `ino` (one just deleted), made by
        `make(role)` (default: a bare host). Its freeing is asynchronous, and namespace inodes
        come from the same pool as /proc entries, lowest free first: candidates made like the
        deleted one (same devices) are kept until one gets it: made in the same order as
        the deleted one, with nothing else freed since it was made (settle() before it), the
        first one usually does."""
        for n in range(tries):
            host = (make or self.host)(f"{role}{n}")
            if host.inode == ino:
                return host
            time.sleep(0.1)
        raise AssertionError(f"no new namespace got inode {ino} in {tries} tries")

    def routed_server(self, role: str, tcp_fastopen: str) -> Route:
        """A server namespace behind a router namespace (forwarding on, IPv4 and IPv6), where
        a test's middlebox rules go: the path client -- router -- server."""
        router, srv = self.host(f"{role}r"), self.host(role)
        vias = []  # (the router's IPv4, its IPv6) on each side; the server's last
        for a, b in ((self.client, router), (router, srv)):
            _, b4 = self.link(a, b)
            net6 = f"fd00:7f0:{self._subnet}"
            for host, end in ((a, 1), (b, 2)):  # link()'s devices: ta* in a, tb* in b
                sh("ip", "-n", host.name, "addr", "add", f"{net6}::{end}/64",
                   "dev", f"t{'ab'[end - 1]}{self._subnet}{self.tag}", "nodad")
            vias.append((b4, f"{net6}::2"))
        (via4, via6), (srv4, srv6) = vias
        sh("ip", "-n", self.client.name, "route", "add", "default", "via", via4)
        sh("ip", "-n", self.client.name, "-6", "route", "add", "default", "via", via6)
        back4, back6 = srv4.rsplit(".", 1)[0] + ".1", srv6.removesuffix("::2") + "::1"
        sh("ip", "-n", srv.name, "route", "add", "default", "via", back4)
        sh("ip", "-n", srv.name, "-6", "route", "add", "default", "via", back6)
        router.sysctl("net.ipv4.ip_forward", "1")
        router.sysctl("net.ipv6.conf.all.forwarding", "1")
        srv.sysctl("net.ipv4.tcp_fastopen", tcp_fastopen)
        return Route(srv, router, srv4, srv6)

    def start_server(self, host: Host, *ports: str, v6: bool = False) -> Path:
        log = Path(self.tmp.name) / f"{host.name}.jsonl"
        log.touch()
        proc = host.popen("server", *ports, "--log", str(log), *(["--v6"] if v6 else []))
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"server did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
        return log

    @staticmethod
    def accepted(log: Path) -> list[dict[str, object]]:
        deadline = time.monotonic() + 5
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            time.sleep(0.2)
            if rows == [json.loads(line) for line in log.read_text().splitlines()]:
                break
        return rows

    def _stop(self, procs: list[subprocess.Popen[str]]) -> None:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.procs.remove(p)

    def close_host(self, host: Host) -> None:
        """Stop the processes started in `host` and delete its namespace: the host is gone."""
        self._stop([p for p in self.procs if host.name in list(p.args)])  # type: ignore[arg-type]
        sh("ip", "netns", "del", host.name)

    def close(self) -> None:
        self._stop(list(self.procs))
        for h in self.hosts:
            sh("ip", "netns", "del", h.name, check=False)
        if self.cgroup is not None:
            self.cgroup.rmdir()
        self.tmp.cleanup()


SYSTEMD = Path(__file__).parents[1] / "deploy" / "systemd"


def unit_caps(*dropins: str) -> list[str]:
    """CapabilityBoundingSet of deploy/systemd/tfowatch.service (merged with the named drop-ins, as
    systemd merges them), e.g. ['bpf', 'perfmon', 'sys_ptrace']."""
    caps: list[str] = []
    for f in [SYSTEMD / "tfowatch.service", *(SYSTEMD / "dropins" / d for d in dropins)]:
        for line in f.read_text().splitlines():
            if line.startswith("CapabilityBoundingSet="):
                caps += [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]
    return sorted(set(caps))


def with_caps(caps: list[str]) -> list[str]:
    """A command prefix: run as root but with only `caps`, as the systemd unit does."""
    return ["setpriv", "--bounding-set=-all," + ",".join(f"+{c}" for c in caps), "--inh-caps=-all"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """A process's resident set, from /proc (not the daemon's word)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=30).read().decode()  # a loaded TCG guest is slow
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str | int) -> float:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {lab: v for (n, lab), v in samples.items() if n == name}


def start_daemon(listen: str, caps: list[str], *flags: str, binary: Path = TFOWATCH,
                 cwd: Path | None = None) -> subprocess.Popen[str]:
    """`tfowatch run` with only `caps`, as systemd would start it; `binary` may be an installed
    one, started from `cwd`."""
    proc = subprocess.Popen([*with_caps(caps), str(binary), "run", "--listen", listen, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.monotonic() + BPF_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"tfowatch exited {proc.returncode}: {err}")
        try:
            urllib.request.urlopen(f"http://{listen}/metrics", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("tfowatch did not serve /metrics in time")


def planned_plan(binary: Path = TFOWATCH, cwd: str | None = None, mode: str = "auto") -> dict[str, Any]:
    """`tfowatch probes --json` of `binary` (e.g. an installed one, run from `cwd`): the plan
    this kernel resolves to in `mode` (its tier, and the metrics of every tier). A daemon
    running below that tier fell back, which tests must not accept."""
    out = subprocess.run([str(binary), "probes", "--json", "--mode", mode], capture_output=True,
                         text=True, check=True, cwd=cwd)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def skip_unless_root_bpf(what: str, *tools: str) -> None:
    """Skip (saying why) where this machine cannot run `what`; `tools` must be on PATH."""
    why = has_root_bpf() or next((f"{t} is not installed (make setup installs it)"
                                  for t in tools if not shutil.which(t)), "")
    if why:
        pytest.skip(f"{what}: {why}")


def has_root_bpf() -> str:
    """Empty when this machine can run the root/BPF tests, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    return ""


@dataclass
class Exchange:
    """One TFO exchange between two namespaces, and the kernel's own count of it."""
    client: Host
    server: Host
    connections: int
    deltas: dict[str, int]  # TcpExt increase, client's Active + server's Passive/CookieReqd

    def assert_counted_exactly(self, samples: Samples) -> None:
        """The daemon's probe counts equal the kernel's (every tier with probes sees these)."""
        def total(name: str, ns: Host) -> float:
            return sum(v for lab, v in series(samples, name).items() if ("netns", str(ns.inode)) in lab)

        accepted = total("tfowatch_syn_data_accepted_total", self.server)
        acked = total("tfowatch_syn_data_acked_total", self.client)
        assert accepted == self.deltas["TCPFastOpenPassive"] == self.connections - 1, (accepted, self.deltas)
        assert acked == self.deltas["TCPFastOpenActive"] == self.connections - 1, (acked, self.deltas)
        kernel = value(samples, "tfowatch_kernel_tcpext_total", netns=self.server.inode,
                       counter="TCPFastOpenPassive")
        assert kernel == self.server.tcpext()["TCPFastOpenPassive"]


def tfo_exchange(lab: Lab, connections: int = 4, port: int = 7101) -> Exchange:
    """`connections` TFO connects from the lab's client to a new server namespace: the first
    asks for a cookie, the others carry SYN data that the server accepts."""
    srv, addr = lab.server("x", "3")
    lab.start_server(srv, str(port))
    before = {"client": lab.client.tcpext(), "server": srv.tcpext()}
    rows = lab.client.peer("client", addr, str(port), str(connections), "--comm", "tfo-x")
    assert len(rows) == connections
    time.sleep(0.5)  # the last FIN/ACKs
    after = {"client": lab.client.tcpext(), "server": srv.tcpext()}
    sides = {"TCPFastOpenActive": "client", "TCPFastOpenPassive": "server", "TCPFastOpenCookieReqd": "server"}
    deltas = {c: after[side][c] - before[side][c] for c, side in sides.items()}
    return Exchange(lab.client, srv, connections, deltas)


def doctor(*hosts: Host, watch: float | None = None) -> tuple[int, dict[str, Any]]:
    """`tfowatch doctor -o json` on these hosts' namespaces: its exit code and report."""
    from tfowatch.cli import EXIT_FINDINGS

    args = [str(TFOWATCH), "doctor", "-o", "json"]
    for h in hosts:
        args += ["--netns", h.name]
    if watch:
        args += ["--watch", str(watch)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode in (0, EXIT_FINDINGS), res.stderr
    return res.returncode, json.loads(res.stdout)


def config_hz() -> tuple[int, str]:
    """The host kernel's CONFIG_HZ from its own config, and which file said it."""
    for name in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        path = Path(name)
        if not path.exists():
            continue
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode(errors="replace")
        if m := re.search(r"^CONFIG_HZ=(\d+)$", text, re.M):
            return int(m.group(1)), name
    pytest.skip("this host has no readable kernel config to check CONFIG_HZ against")


class DoctorWatch:
    """`tfowatch doctor -o json --watch` on these hosts' namespaces in the background: started
    once it watches (probes attached, first survey done); `report()` ends the window with SIGINT
    (as an operator's Ctrl-C) and returns its exit code, report and stderr."""

    def __init__(self, *hosts: Host) -> None:
        args = [str(TFOWATCH), "doctor", "-o", "json", "--watch", "600"]
        for h in hosts:
            args += ["--netns", h.name]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        started = ""
        while "watching" not in started:  # BCC's compiler warnings may come first
            started = self.proc.stderr.readline()
            if not started:
                self.proc.kill()
                raise AssertionError(f"doctor exited {self.proc.wait()} before watching")

    def __enter__(self) -> DoctorWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.kill()  # a window the test did not end (it failed first)
        self.proc.wait()

    def report(self) -> tuple[int, dict[str, Any], str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=BPF_START_S)
        assert out, f"doctor exited {self.proc.returncode} with no report: {err}"
        return self.proc.returncode, json.loads(out), err


class TopProcess:
    """`tfowatch top -o json` in the background; every line it prints, parsed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(TFOWATCH), "top", "-o", "json", "-i", "0.5", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.frames: list[dict[str, Any]] = []
        self._got = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._got:
                self.frames.append(json.loads(line))
                self._got.notify_all()

    def wait_frames(self, n: int, timeout: float = BPF_START_S + 30) -> None:
        """Until `n` frames have arrived (the first one means the probes are attached)."""
        with self._got:
            if not self._got.wait_for(lambda: len(self.frames) >= n or self.proc.poll() is not None,
                                      timeout=timeout):
                raise AssertionError("tfowatch top printed no frame in time")
        if len(self.frames) < n:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"tfowatch top exited {self.proc.returncode}: {err}")

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return code, self.proc.stderr.read() if self.proc.stderr else ""


def findings(report: dict[str, Any], code: str, host: Host) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["code"] == code and f["netns"] == host.inode]
