"""The /metrics server's answers to clients that are not Prometheus, on loopback, with a fixed
body (no BPF): HEAD, other methods, what the Server header says, and a TLS client that closes
mid-request."""

from __future__ import annotations

import gzip
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import certs
import pytest
from netlab import free_port
from prometheus_client import CollectorRegistry

from tfowatch.exporter import web
from tfowatch.exporter.web import MetricsServer
from tfowatch.exporter.webconfig import load

BODY = b"tfowatch_up 1\n"


class FixedScrape:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.registry = CollectorRegistry()  # the server adds its own metrics to it
        self.gate = gate

    def render(self, gzipped: bool = False) -> bytes:
        if self.gate is not None:  # a scrape that takes until the test lets it go
            self.gate.wait(30)
        return gzip.compress(BODY) if gzipped else BODY


def serve(tmp_path: Path | None = None, pki: certs.Pki | None = None) -> tuple[MetricsServer, int]:
    port = free_port()
    web = None
    if tmp_path is not None and pki is not None:
        cfg = tmp_path / "web.yml"
        cfg.write_text(f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.server_key}\n")
        web = load(str(cfg))
    srv = MetricsServer("127.0.0.1", port, web)
    srv.start(FixedScrape())  # type: ignore[arg-type]
    return srv, port


@pytest.fixture
def plain() -> Iterator[int]:
    srv, port = serve()
    try:
        yield port
    finally:
        srv.close()


def exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}, body


def test_head_has_the_headers_of_get_and_no_body(plain: int) -> None:
    status, get_headers, body = exchange(plain, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status.endswith("200 OK") and body == BODY
    status, headers, body = exchange(plain, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert status.endswith("200 OK") and body == b""
    assert headers["content-length"] == get_headers["content-length"] == str(len(BODY))


def test_other_methods_are_405_and_the_server_names_no_python(plain: int) -> None:
    status, headers, _ = exchange(plain, b"POST /metrics HTTP/1.0\r\n\r\n")
    assert status.endswith("405 Method Not Allowed") and headers["allow"] == "GET, HEAD"
    assert headers["server"] == "tfowatch"
    _, headers, _ = exchange(plain, b"BOGUS\r\n\r\n")  # http.server's own error page
    assert "python" not in headers.get("server", "").lower()


def test_a_tls_client_closing_mid_request_leaves_no_traceback(tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    pki = certs.make(tmp_path)
    srv, port = serve(tmp_path, pki)
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        for partial in (b"GET /metr", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"):
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                 server_hostname="127.0.0.1") as t:
                t.sendall(partial)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # and the server still answers
            assert t.recv(4096).startswith(b"HTTP/1.0 200 OK")
    finally:
        srv.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    sys.stderr.write(err)


def test_a_whole_request_waits_for_an_answer_slot_then_gets_a_503() -> None:
    """One answer slot, held by a scrape that does not end: the next whole request waits
    ANSWER_WAIT_S for the slot and is told 503 (counted), not dropped; once the slot is
    free, requests are answered again."""
    gate = threading.Event()
    port = free_port()
    srv = MetricsServer("127.0.0.1", port, max_connections=1)
    scrape = FixedScrape(gate)
    srv.start(scrape)  # type: ignore[arg-type]
    try:
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        time.sleep(0.5)
        t0 = time.monotonic()
        status, _, _ = exchange(port, b"GET / HTTP/1.0\r\n\r\n")
        assert status.split()[1] == "503" and web.ANSWER_WAIT_S <= time.monotonic() - t0 < 10
        gate.set()
        assert held.recv(4096).startswith(b"HTTP/1.0 200 OK")
        held.close()
        assert exchange(port, b"GET / HTTP/1.0\r\n\r\n")[0].split()[1] == "200"
        assert scrape.registry.get_sample_value("tfowatch_http_requests_total", {"code": "503"}) == 1
    finally:
        gate.set()
        srv.close()


def test_the_listen_backlog_holds_a_storm_of_clients(plain: int) -> None:
    """socketserver's default backlog (5) dropped SYNs when 20 clients scraped at once, each a
    1 s retransmission for its client: the listener's backlog (ss' Send-Q) is the kernel's cap."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{plain}"], capture_output=True, text=True, check=True)
    (line,) = out.stdout.splitlines()
    backlog = int(line.split()[2])
    assert backlog >= 128, line
