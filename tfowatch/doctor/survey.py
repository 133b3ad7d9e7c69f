"""A snapshot of what each network namespace says about TFO and TIME-WAIT, for `doctor`:
its sysctls, TcpExt counters, listeners (with their TCP_FASTOPEN queue), TFO key,
TIME-WAIT sockets per destination and the TFO cookies its TCP metrics cache holds."""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from tfowatch.core import netns, nsconfig, procfs
from tfowatch.core.nsconfig import NamespaceConfig
from tfowatch.doctor import listeners, socktable
from tfowatch.doctor.listeners import Listener

ZERO_KEY = "00000000-00000000-00000000-00000000"


@dataclass(frozen=True)
class KeyInfo:
    """The TFO key, never shown: a short fingerprint lets operators compare nodes."""
    set: bool  # False: all zeros, generated on the first TFO listener
    fingerprint: str  # sha256 of the primary key, 12 hex digits ("" when unset)
    backup: bool  # a backup key (primary,backup) keeps cookies of the previous key valid


@dataclass(frozen=True)
class PeerMetrics:
    """One destination in the namespace's TCP metrics cache (`ip tcp_metrics`)."""
    address: str
    cookie: bool  # a TFO cookie from this server is cached: it speaks TFO
    syn_drops: int  # SYNs with data this server (or a middlebox) dropped


@dataclass
class NamespaceSurvey:
    config: NamespaceConfig
    handle: str  # how to enter it (netns.discover())
    tcpext: dict[str, int]
    listeners: list[Listener]
    key: KeyInfo
    # (remote addr, remote port) -> TIME-WAIT sockets on ephemeral local ports
    time_wait: Counter[tuple[str, int]] = field(default_factory=Counter)
    peers: dict[str, PeerMetrics] = field(default_factory=dict)

    @property
    def netns(self) -> int:
        return self.config.netns

    @property
    def port_range(self) -> int:
        """How many ephemeral ports ip_local_port_range allows."""
        low, high = _port_range(self.config)
        return max(high - low + 1, 0)


def _port_range(config: NamespaceConfig) -> tuple[int, int]:
    try:
        low, high = map(int, config.raw["ip_local_port_range"].split())
    except (KeyError, ValueError):
        return 1, 0  # unknown: empty
    return low, high


def parse_key(text: str) -> KeyInfo:
    keys = [k.strip() for k in text.strip().split(",") if k.strip()]
    primary = keys[0] if keys else ZERO_KEY
    if primary == ZERO_KEY:
        return KeyInfo(False, "", False)
    digest = hashlib.sha256(primary.encode()).hexdigest()[:12]
    return KeyInfo(True, digest, len(keys) > 1 and keys[1] != ZERO_KEY)


def parse_tcp_metrics(text: str) -> dict[str, PeerMetrics]:
    """`ip tcp_metrics show` lines: ADDR age ... [fo_cookie HEX] [fo_syn_drops N/...]. Parsed
    by hand: pyroute2 0.9 has no client for the tcp_metrics genetlink family, and iproute2's
    text is stable (one line per address)."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        drops = 0
        if "fo_syn_drops" in words:
            drops = int(words[words.index("fo_syn_drops") + 1].split("/")[0])
        out[words[0]] = PeerMetrics(words[0], "fo_cookie" in words, drops)
    return out


class _Read(NamedTuple):
    key_text: str
    metrics_text: str
    tcpext: dict[str, int]
    rows: list[socktable.SocketRow]


def _inside() -> tuple[str, str]:
    """(tcp_fastopen_key, `ip tcp_metrics show`) read from inside the namespace. The key
    sysctl is root-only; `ip` inherits this thread's namespace when forked from it."""
    key = procfs.path("sys", "net", "ipv4", "tcp_fastopen_key").read_text()
    metrics = subprocess.run(["ip", "tcp_metrics", "show"], capture_output=True, text=True,
                             timeout=10).stdout
    return key, metrics


def survey(only: set[int] | None = None) -> dict[int, NamespaceSurvey]:
    """Every namespace found (or those in `only`), inode -> its survey."""
    handles = netns.discover()
    if only is not None:
        handles = {ino: h for ino, h in handles.items() if ino in only}
    configs = nsconfig.read(handles=handles)
    read: dict[int, _Read] = {}
    for ino in configs:
        handle = handles[ino]
        try:
            key_text, metrics_text = netns.run_in(handle, _inside)
            read[ino] = _Read(key_text, metrics_text, netns.tcpext(handle), socktable.read(handle))
        except OSError:  # the namespace went away meanwhile
            continue
    # One read of each socket table serves both the listeners and the TIME-WAIT count.
    found = listeners.from_tables({ino: r.rows for ino, r in read.items()}, sockopts=True)
    out = {}
    for ino, (key_text, metrics_text, tcpext, rows) in read.items():
        config = configs[ino]
        out[ino] = NamespaceSurvey(
            config=config, handle=handles[ino], tcpext=tcpext,
            listeners=sorted((lst for (n, _), lst in found.items() if n == ino), key=lambda x: x.port),
            key=parse_key(key_text), time_wait=time_wait_per_destination(rows, config),
            peers=parse_tcp_metrics(metrics_text))
    return out


def time_wait_per_destination(rows: list[socktable.SocketRow], config: NamespaceConfig
                              ) -> Counter[tuple[str, int]]:
    """(remote address, remote port) -> TIME-WAIT sockets on ephemeral local ports: only those
    hold what connect() could pick."""
    low, high = _port_range(config)
    return Counter((r.remote, r.remote_port) for r in rows
                   if r.state == socktable.TIME_WAIT and low <= r.local_port <= high)
