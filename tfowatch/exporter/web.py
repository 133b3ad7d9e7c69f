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
import contextlib
import hashlib
import io
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import bcrypt
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram

from tfowatch.core import metrics as m
from tfowatch.exporter.collector import Scrape
from tfowatch.exporter.config import PENDING_PER_SLOT
from tfowatch.exporter.webconfig import WebConfig

log = logging.getLogger(__name__)
IO_TIMEOUT_S = 10.0  # any one read or write, once the request is in
CLOSE_WAIT_S = 2.0
MAX_THREADS_PER_PENDING = 2  # a hard bound on threads, while cut connections wind down
ANSWER_WAIT_S = 5.0  # a whole request waits this long for an answer slot, then gets a 503
# Why a connection is closed before it is answered: tfowatch_http_connections_refused_total.
REFUSED_REASONS = ("timeout", "evicted", "tls_failed", "rejected")
# Answered by the server before the app sees the request, but counted as requests: by status.
ANSWERED_BY_SERVER = {"plain_http": "400", "busy": "503"}
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
    server: _Server
    server_version, sys_version = "tfowatch", ""  # http.server's own errors name no Python

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def get_stderr(self) -> io.StringIO:
        return _DebugLog()

    def parse_request(self) -> bool:
        """The request line and headers are in: the connection stops being pending and waits
        for one of the answer slots, or is told 503."""
        if not super().parse_request():
            return False
        if self.server.admit():
            return True
        self.server.on_event("busy")
        self.send_error(503, "Busy")
        return False


@dataclass
class _Pending:
    """A connection whose request is not in yet: the TLS handshake, the request line, headers."""
    sock: socket.socket
    since: float
    cut: str = ""  # why it was cut: "timeout" or "evicted"


class _Server(WSGIServer):
    """WSGIServer with a thread per connection and TLS done in that thread. A connection must
    deliver its whole request (handshake included) within `header_timeout`, or it is cut;
    connections still sending are bounded at PENDING_PER_SLOT times the answer slots, and a
    new one cuts the oldest of them. So idle or byte-a-second clients cannot hold the slots a
    scrape needs: only whole requests wait for one of `max_connections` answer slots."""

    def __init__(self, address: tuple[str, int], family: int, tls: ssl.SSLContext | None,
                 max_connections: int, header_timeout: float, on_event: Callable[[str], None]) -> None:
        self.address_family = family
        self.tls = tls
        self.on_event = on_event
        self.header_timeout = header_timeout
        self.max_pending = PENDING_PER_SLOT * max_connections
        self._answering = threading.BoundedSemaphore(max_connections)
        self._pending: dict[int, _Pending] = {}  # by thread ident, oldest first
        self._admitted: set[int] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        # socketserver's listen backlog is 5: twenty clients at once overflowed it, and a SYN the
        # kernel dropped cost its client a 1 s retransmission (the storm's p99). The kernel caps
        # it at net.core.somaxconn; the bounds that matter are the ones above.
        self.request_queue_size = socket.SOMAXCONN
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._threads) >= MAX_THREADS_PER_PENDING * self.max_pending:  # cut ones not gone yet
                self.on_event("rejected")
                self.shutdown_request(request)
                return
            sending = [p for p in self._pending.values() if not p.cut]
            if len(sending) >= self.max_pending:
                self._cut(sending[0], "evicted")
        t = threading.Thread(target=self._serve_one, args=(request, client_address),
                             name="tfowatch-http", daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval: cut what is over its deadline."""
        late = time.monotonic() - self.header_timeout
        with self._lock:
            for pending in self._pending.values():
                if pending.since < late:
                    self._cut(pending, "timeout")

    def _cut(self, pending: _Pending, why: str) -> None:
        """Shut the connection down under its reader (it sees EOF and ends). Under self._lock,
        so the thread cannot close the socket, and its number be reused, meanwhile."""
        if not pending.cut:
            pending.cut = why
            self.on_event(why)
        with contextlib.suppress(OSError):  # gone already, or detached mid TLS wrap: next tick
            socket.socket.shutdown(pending.sock, socket.SHUT_RDWR)

    def admit(self) -> bool:
        me = threading.get_ident()
        with self._lock:
            pending = self._pending.pop(me, None)
        if pending is None or pending.cut:
            return False
        if not self._answering.acquire(timeout=ANSWER_WAIT_S):
            return False
        with self._lock:
            self._admitted.add(me)
        return True

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        me = threading.get_ident()
        pending = _Pending(request, time.monotonic())
        with self._lock:
            self._pending[me] = pending
        conn: socket.socket | None = request
        try:
            request.settimeout(IO_TIMEOUT_S)
            if self.tls is not None:
                conn = self._handshake(request, pending)
            if conn is not None:
                self.finish_request(conn, client_address)
        except OSError as exc:  # timeouts, resets, TLS alerts: the client's problem, not ours
            log.debug("connection from %s: %s", client_address, exc)
        finally:
            with self._lock:
                self._pending.pop(me, None)
                admitted = me in self._admitted
                self._admitted.discard(me)
                self.shutdown_request(conn if conn is not None else request)
                self._threads.discard(threading.current_thread())
            if admitted:
                self._answering.release()

    def _handshake(self, sock: socket.socket, pending: _Pending) -> ssl.SSLSocket | None:
        assert self.tls is not None
        head = sock.recv(1, socket.MSG_PEEK)
        if head and head != b"\x16":  # not a TLS handshake record: answer in plain HTTP
            self.on_event("plain_http")
            sock.sendall(PLAIN_HTTP_TO_TLS)
            return None
        try:
            conn = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                pending.sock = conn  # the wrap took the socket over: a cut goes to this one
            conn.do_handshake()
            return conn
        except (ssl.SSLError, OSError) as exc:
            if not pending.cut:
                self.on_event("tls_failed")
            log.debug("TLS handshake failed: %s", exc)
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("request from %s failed", client_address, exc_info=True)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class MetricsServer:
    def __init__(self, host: str, port: int, web: WebConfig | None = None,
                 max_connections: int = 16, header_timeout: float = 5.0) -> None:
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), family, self.web.tls, max_connections, header_timeout,
                               self._count_event)
        self._thread: threading.Thread | None = None
        self._requests: Counter | None = None
        self._scrape: Histogram | None = None
        self._conn_events: Counter | None = None

    def _count_event(self, what: str) -> None:
        if what in ANSWERED_BY_SERVER:
            if self._requests is not None:
                self._requests.labels(ANSWERED_BY_SERVER[what]).inc()
        elif self._conn_events is not None:
            self._conn_events.labels(what).inc()

    def start(self, scrape: Scrape) -> None:
        """Serve `scrape` (plus the server's own metrics, added to its registry) from a thread."""
        registry = scrape.registry
        req, dur, refused = m.HTTP_REQUESTS, m.SCRAPE_DURATION, m.HTTP_CONNECTIONS_REFUSED
        self._requests = Counter(req.family, req.help, req.labels, registry=registry)
        self._scrape = Histogram(dur.family, dur.help, registry=registry, buckets=dur.buckets)
        self._conn_events = Counter(refused.family, refused.help, refused.labels, registry=registry)
        for reason in REFUSED_REASONS:  # a 0 from the start: rate() and alerts see the first one
            self._conn_events.labels(reason)
        self._server.set_app(self._app(scrape.render))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                         name="tfowatch-http-accept", daemon=True)
        self._thread.start()

    def _app(self, render: Callable[[bool], bytes]) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
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
                    gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
                    body = render(gzipped)
                    headers = [("Content-Type", CONTENT_TYPE_LATEST)]
                    if gzipped:
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
