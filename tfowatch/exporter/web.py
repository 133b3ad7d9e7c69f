"""The HTTP(S) server for /metrics: TLS, client certificates and basic auth from the web
config, a bound on concurrent connections, and I/O timeouts, so a slow or hostile client
cannot hold the daemon. The socket is bound before any BPF is loaded: a port in use fails
fast, and a restart can take the port over at once (SO_REUSEADDR).

Each connection gets a thread; the TLS handshake runs there, not in the accept loop, so a
client that connects and says nothing blocks only its own slot until the timeout.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import bcrypt
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram

from tfowatch.core import metrics as m
from tfowatch.exporter.collector import Scrape
from tfowatch.exporter.webconfig import WebConfig

log = logging.getLogger(__name__)
IO_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 2.0
PLAIN_HTTP_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                     b"Client sent an HTTP request to an HTTPS server.\n")
LANDING = (b"<html><head><title>tfowatch</title></head><body><h1>tfowatch</h1>"
           b"<p><a href=\"/metrics\">Metrics</a></p></body></html>\n")
Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes. A bcrypt check costs tens of ms
    on purpose, so a correct pair is remembered (as a keyed digest, never in clear) and every
    later scrape costs a hash; unknown users cost the same as known ones (no user probing)."""

    CACHE_MAX = 1024

    def __init__(self, users: dict[str, bytes]) -> None:
        self.users = users
        self._key = secrets.token_bytes(32)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(10))
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        digest = hashlib.blake2b(f"{user}\0{password}".encode(), key=self._key).digest()
        with self._lock:
            if digest in self._ok:
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), self.users.get(user, self._dummy))
        except ValueError:  # over bcrypt's 72 bytes: no hash accepts it
            return False
        if ok and sep and user in self.users:
            with self._lock:
                if len(self._ok) >= self.CACHE_MAX:
                    self._ok.clear()
                self._ok.add(digest)
            return True
        return False


class _DebugLog(io.StringIO):
    """wsgiref's error stream: the traceback of a client that went away mid-answer (a reset, a
    TLS close) becomes one DEBUG line instead of a traceback on stderr."""

    def flush(self) -> None:
        if lines := self.getvalue().strip().splitlines():
            log.debug("answer not delivered: %s", lines[-1])
        self.seek(0)
        self.truncate()


class _QuietHandler(WSGIRequestHandler):
    server_version, sys_version = "tfowatch", ""  # http.server's own errors name no Python

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def get_stderr(self) -> io.StringIO:
        return _DebugLog()


class _Server(WSGIServer):
    """WSGIServer with a thread per connection, bounded, and TLS done in that thread."""

    def __init__(self, address: tuple[str, int], family: int, tls: ssl.SSLContext | None,
                 max_connections: int, on_event: Callable[[str], None]) -> None:
        self.address_family = family
        self.tls = tls
        self.on_event = on_event
        self._slots = threading.BoundedSemaphore(max_connections)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.on_event("rejected")
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._serve_one, args=(request, client_address),
                             name="tfowatch-http", daemon=True)
        with self._threads_lock:
            self._threads.add(t)
        t.start()

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        conn: socket.socket | None = request
        try:
            request.settimeout(IO_TIMEOUT_S)
            if self.tls is not None:
                conn = self._handshake(request)
            if conn is not None:
                self.finish_request(conn, client_address)
        except OSError as exc:  # timeouts, resets, TLS alerts: the client's problem, not ours
            log.debug("connection from %s: %s", client_address, exc)
        finally:
            self.shutdown_request(conn if conn is not None else request)
            self._slots.release()
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket | None:
        assert self.tls is not None
        head = sock.recv(1, socket.MSG_PEEK)
        if head and head != b"\x16":  # not a TLS handshake record: answer in plain HTTP
            self.on_event("plain_http")
            sock.sendall(PLAIN_HTTP_TO_TLS)
            return None
        try:
            return self.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.on_event("tls_failed")
            log.debug("TLS handshake failed: %s", exc)
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("request from %s failed", client_address, exc_info=True)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class MetricsServer:
    def __init__(self, host: str, port: int, web: WebConfig | None = None,
                 max_connections: int = 16) -> None:
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), family, self.web.tls, max_connections, self._count_event)
        self._thread: threading.Thread | None = None
        self._requests: Counter | None = None
        self._scrape: Histogram | None = None
        self._conn_events: Counter | None = None

    def _count_event(self, what: str) -> None:
        if what == "plain_http" and self._requests is not None:
            self._requests.labels("400").inc()
        elif self._conn_events is not None:
            self._conn_events.labels(what).inc()

    def start(self, scrape: Scrape) -> None:
        """Serve `scrape` (plus the server's own metrics, added to its registry) from a thread."""
        registry = scrape.registry
        req, dur, refused = m.HTTP_REQUESTS, m.SCRAPE_DURATION, m.HTTP_CONNECTIONS_REFUSED
        self._requests = Counter(req.family, req.help, req.labels, registry=registry)
        self._scrape = Histogram(dur.family, dur.help, registry=registry, buckets=dur.buckets)
        self._conn_events = Counter(refused.family, refused.help, refused.labels, registry=registry)
        self._server.set_app(self._app(scrape.render))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                         name="tfowatch-http-accept", daemon=True)
        self._thread.start()

    def _app(self, render: Callable[[], bytes]) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
        Answer = tuple[str, list[tuple[str, str]], bytes]
        text = [("Content-Type", "text/plain")]

        def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            method = environ.get("REQUEST_METHOD", "GET")
            if method in ("GET", "HEAD"):
                status, headers, body = answer(environ)
            else:
                status, headers, body = "405 Method Not Allowed", [("Allow", "GET, HEAD"), *text], \
                    b"Method Not Allowed\n"
            assert self._requests is not None
            self._requests.labels(status.split()[0]).inc()
            # Server: ours, or wsgiref would name its own and the Python version.
            start_response(status, [*headers, ("Content-Length", str(len(body))), ("Server", "tfowatch")])
            return [b"" if method == "HEAD" else body]  # HEAD: GET's headers, no body

        def answer(environ: Environ) -> Answer:
            if self.auth is not None and not self.auth.check(environ.get("HTTP_AUTHORIZATION")):
                return "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="tfowatch"'), *text], \
                    b"Unauthorized\n"
            path = environ.get("PATH_INFO", "/")
            if path == "/metrics":
                return metrics(environ)
            if path == "/":
                return "200 OK", [("Content-Type", "text/html")], LANDING
            return "404 Not Found", text, b"Not Found\n"

        def metrics(environ: Environ) -> Answer:
            assert self._scrape is not None
            try:
                with self._scrape.time():
                    body = render()
                    headers = [("Content-Type", CONTENT_TYPE_LATEST)]
                    if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                        body = gzip.compress(body, compresslevel=1)
                        headers.append(("Content-Encoding", "gzip"))
                    return "200 OK", headers, body
            except Exception:  # e.g. a scrape racing shutdown: an answer, not a traceback
                log.warning("scrape failed", exc_info=log.isEnabledFor(logging.DEBUG))
                return "503 Service Unavailable", text, b"Service Unavailable\n"
        return app

    def reload(self, web: WebConfig) -> None:
        """Serve with `web` from the next connection on (SIGHUP); connections open finish as
        they began."""
        self.auth = BasicAuth(web.users) if web.users else None
        self._server.tls = web.tls
        self.web = web

    def close(self) -> None:
        """Stop accepting, close the socket, and give requests in flight a moment to finish."""
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        self._server.join(CLOSE_WAIT_S)
