"""Slow and hostile clients cannot hold /metrics (issue 16, case 6): 50 slowloris clients, each
sending a byte a second and reconnecting whenever it is cut, while a Prometheus-style scraper
asks every second. Plain HTTP, a TLS handshake sent slowly, and TLS with basic auth where the
headers come slowly after the handshake. A real daemon (`tfowatch run --mode counters`: no BPF,
the HTTP server is the same on every tier) on loopback."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import certs
import pytest
from netlab import TFOWATCH, free_port

PASSWORD = "correct horse"
CLIENTS = 50
SCRAPES = 12  # one a second: over two header_timeouts, so clients are cut and come back
HEADER_TIMEOUT_S = 5  # the daemon's default
SCRAPE_TIMEOUT_S = 10.0  # Prometheus' default scrape_timeout
assert SCRAPES > 2 * HEADER_TIMEOUT_S


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make(tmp_path_factory.mktemp("pki"))


@dataclass
class Daemon:
    port: int
    tls: ssl.SSLContext | None = None  # the scraper's context
    auth: str = ""
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/metrics"

    def scrape(self) -> tuple[int, float, str]:
        """(status, seconds, body) of one scrape, as Prometheus makes it: a new connection."""
        headers = {"Authorization": f"Basic {self.auth}"} if self.auth else {}
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                        context=self.tls, timeout=SCRAPE_TIMEOUT_S) as resp:
                return resp.status, time.monotonic() - t0, resp.read().decode()
        except OSError as exc:  # URLError, HTTPError, timeouts
            return getattr(exc, "code", 0) or 0, time.monotonic() - t0, str(exc)

    def refused(self, reason: str) -> float:
        series = f'tfowatch_http_connections_refused_total{{reason="{reason}"}} '
        body = self.scrape()[2]
        return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(series))


def start(tmp_path: Path, extra: list[str], web: str = "", **kw: object) -> Daemon:
    port = free_port()
    cmd = [str(TFOWATCH), "run", "--mode", "counters", "--listen", f"127.0.0.1:{port}", *extra]
    if web:
        (tmp_path / "web.yml").write_text(web)
        cmd += ["--web-config-file", str(tmp_path / "web.yml")]
    d = Daemon(port, **kw)  # type: ignore[arg-type]
    d.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while d.scrape()[0] != 200:
        assert d.proc.poll() is None and time.monotonic() < deadline, d.proc.stderr and d.proc.stderr.read()
        time.sleep(0.3)
    return d


def stop(d: Daemon) -> str:
    assert d.proc is not None
    d.proc.terminate()
    _, err = d.proc.communicate(timeout=20)
    assert d.proc.returncode == 0, err
    assert "Traceback" not in err, err
    return err


@dataclass
class Slowloris:
    """CLIENTS connections that each send one byte a second of `opening` and never finish;
    when the server cuts one, it connects again at once."""
    port: int
    opening: bytes
    wrap: Callable[[socket.socket], socket.socket] = lambda s: s
    stop: threading.Event = field(default_factory=threading.Event)
    connects: int = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.wrap(socket.create_connection(("127.0.0.1", self.port), timeout=5)) as s:
                    self.connects += 1
                    for byte in self.opening:
                        s.sendall(bytes([byte]))
                        if self.stop.wait(1.0):
                            return
            except OSError:
                time.sleep(0.05)

    def __enter__(self) -> Slowloris:
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()
        time.sleep(2.0)  # all connected and sending before the first scrape
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def scrapes_through(d: Daemon, attack: Slowloris) -> None:
    """Every scrape during the attack answers 200 well within the scrape timeout."""
    before = d.refused("timeout")
    with attack:
        results = []
        for _ in range(SCRAPES):
            status, took, _ = d.scrape()
            results.append((status, round(took, 2)))
            time.sleep(max(0.0, 1.0 - took))
    print(f"{d.url}: scrapes {results}; {attack.connects} slowloris connections")
    assert all(status == 200 for status, _ in results), results
    assert max(took for _, took in results) < SCRAPE_TIMEOUT_S / 2, results
    # the attackers were cut at the header deadline and came back, each time counted
    assert attack.connects > CLIENTS, attack.connects
    assert d.refused("timeout") >= before + CLIENTS, d.refused("timeout")


REQUEST_START = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n"


def test_plain_http(tmp_path: Path) -> None:
    d = start(tmp_path, [])
    try:
        scrapes_through(d, Slowloris(d.port, REQUEST_START))
    finally:
        stop(d)


def test_tls_handshake_sent_slowly(tmp_path: Path, pki: certs.Pki) -> None:
    """A TLS record header and then a ClientHello, a byte a second: the handshake is in the deadline."""
    web = f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.server_key}\n"
    d = start(tmp_path, [], web, tls=ssl.create_default_context(cafile=str(pki.ca)))
    try:
        scrapes_through(d, Slowloris(d.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)))
    finally:
        stop(d)


def test_tls_with_basic_auth_headers_sent_slowly(tmp_path: Path, pki: certs.Pki) -> None:
    """The handshake done at once, then the request's headers a byte a second, never the
    Authorization the server waits for: the deadline covers the whole request."""
    hashed = subprocess.run([str(TFOWATCH), "hash-password"], input=PASSWORD + "\n", capture_output=True,
                            text=True, check=True).stdout.strip()
    web = (f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.server_key}\n"
           f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    d = start(tmp_path, [], web, tls=ctx, auth=base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode())
    try:
        scrapes_through(d, Slowloris(d.port, REQUEST_START,
                                     lambda s: ctx.wrap_socket(s, server_hostname="127.0.0.1")))
    finally:
        stop(d)


def test_a_flood_of_unfinished_requests_evicts_the_oldest(tmp_path: Path) -> None:
    """With one answer slot, 16 connections may be sending at once: 50 slowloris clients
    keep more than that open, so each new connection cuts the oldest unfinished one, and a
    scrape, which finishes its request at once, still gets through."""
    d = start(tmp_path, ["--max-connections", "1"])
    try:
        before = d.refused("evicted")
        with Slowloris(d.port, REQUEST_START):
            results = [d.scrape()[:2] for _ in range(5)]
        assert all(status == 200 for status, _ in results), results
        assert d.refused("evicted") > before, d.refused("evicted")
    finally:
        stop(d)
