"""TFO test peer, run inside a test namespace (`ip netns exec NS python peer.py ...`).

server PORT[:QLEN[:close]] ...     listen with TCP_FASTOPEN (on IPv6 too with --v6); one JSON
        --log FILE [--v6]           line per accepted connection: {port, syn_data, tfo_child};
                                    `close`: answer, then close first (the FIN on its own)
client HOST PORT COUNT [--comm C]   COUNT connections with MSG_FASTOPEN (or plain connect with
        [--plain] [--hold]          --plain, TCP_FASTOPEN_CONNECT with --fastopen-connect; HOST
        [--fastopen-connect]        may be IPv6); prints one JSON line per connection with what
        [--give-up-on-timeout]      the client saw in tcp_info: {acked, client_fail}; --hold keeps
        [--unanswered]              each one open until stdin closes; --give-up-on-timeout: a
                                    connection whose SYN-ACKs are lost is closed once the kernel's
                                    blackhole detection counted it (TCPFastOpenActiveFail), and
                                    prints {established: false, ...}; --unanswered: an answer
                                    that does not come within 1 s is given up with a reset
                                    ({answered: false, ...})
syn-hold HOST PORT COUNT [--comm C] COUNT non-blocking MSG_FASTOPEN SYNs, held open briefly and
                                    closed unanswered; one JSON line per SYN: {syn_data}
tw-bind-reuse HOST PORT             TIME-WAIT reuse by bind()+connect() from the same port
tw-ephemeral HOST PORT [--comm C]   TIME-WAIT reuse of the only ephemeral port
connect-fail HOST PORT COUNT        COUNT plain connects expected to fail; one JSON line each:
        [--comm C]                  {errno}
in-flight-listener PORT             a TFO listener no process holds: its only fd is in flight in
                                    a unix socket's queue (SCM_RIGHTS); prints {ready} and waits
                                    for stdin to close
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import selectors
import socket
import struct
import sys
import threading
import time

TCP_FASTOPEN = 23
TCP_FASTOPEN_CONNECT = 30
TCPI_OPT_SYN_DATA = 32
TCPI_OPT_TFO_CHILD = 128
PR_SET_NAME = 15


def tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(tcpi_options, tcpi_fastopen_client_fail) of a socket."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    options, bits = struct.unpack_from("B", raw, 5)[0], struct.unpack_from("B", raw, 7)[0]
    return options, (bits >> 1) & 0x3


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def listener(port: int, tfo_qlen: int, family: int = socket.AF_INET) -> socket.socket:
    """A listener on every address of `family`; TCP_FASTOPEN with this queue length unless 0."""
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if tfo_qlen:
        ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, tfo_qlen)
    ls.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    ls.listen(128)
    return ls


def converse(conn: socket.socket, close_first: bool = False) -> None:
    """Answer, then wait for the client's FIN before closing: the client closes first
    (TIME-WAIT lands on its side), and a client that holds its connection open (--hold)
    keeps it open on this side too. close_first: answer, then close a moment later (the FIN in
    a segment of its own)."""
    conn.settimeout(5)
    try:
        conn.recv(4096)
        conn.sendall(b"ok")
        if close_first:
            time.sleep(0.3)
            return
        conn.settimeout(600)
        while conn.recv(4096):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def serve(specs: list[str], log_path: str, v6: bool = False) -> None:
    """One JSON line per accepted connection, written at accept; each conversation in a
    thread of its own, so a held connection does not stop the others."""
    sel = selectors.DefaultSelector()
    families = (socket.AF_INET, socket.AF_INET6) if v6 else (socket.AF_INET,)
    for spec in specs:  # PORT[:TFO_QLEN[:close]]
        port, qlen, close_first = [*spec.split(":"), "", ""][:3]
        for family in families:
            sel.register(listener(int(port), int(qlen or 64), family), selectors.EVENT_READ,
                         (int(port), close_first == "close"))
    print("ready", flush=True)
    with open(log_path, "a", buffering=1) as log:
        while True:
            for key, _ in sel.select():
                conn, _addr = key.fileobj.accept()  # type: ignore[union-attr]
                options, _ = tcp_info(conn)
                log.write(json.dumps({"port": key.data[0],
                                      "syn_data": bool(options & TCPI_OPT_SYN_DATA),
                                      "tfo_child": bool(options & TCPI_OPT_TFO_CHILD)}) + "\n")
                threading.Thread(target=converse, args=(conn, key.data[1]), daemon=True).start()


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def active_fails() -> int:
    """This namespace's TCPFastOpenActiveFail."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f]
    for names, values in zip(rows[::2], rows[1::2], strict=True):
        if names[0] == "TcpExt:":
            return int(values[names.index("TCPFastOpenActiveFail")])
    return 0


def give_up_on_timeout(s: socket.socket, host: str, port: int, fastopen_connect: bool) -> None:
    """A TFO connect whose SYN-ACKs the path eats: held until the kernel's blackhole detection
    counts it (its third SYN timeout: 3 s with 6.5+'s linear timeouts, 7 s before), then closed."""
    before = active_fails()
    s.setblocking(False)
    try:
        if fastopen_connect:
            s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            s.connect((host, port))  # deferred: the SYN goes with the first write
            s.send(b"hello")
        else:
            s.sendto(b"hello", socket.MSG_FASTOPEN, (host, port))
    except BlockingIOError:
        pass
    deadline = time.monotonic() + 20
    while active_fails() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    options, fail = tcp_info(s)
    print(json.dumps({"established": False, "acked": bool(options & TCPI_OPT_SYN_DATA),
                      "client_fail": fail, "detected": active_fails() > before}), flush=True)


def client(host: str, port: int, count: int, plain: bool, hold: bool = False,
           fastopen_connect: bool = False, give_up: bool = False, unanswered: bool = False) -> None:
    """unanswered: an answer that does not come within a second is given up: the connection
    is reset (SO_LINGER 0), whatever it holds out of order dropped with it."""
    for _ in range(count):
        s = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            if give_up:
                give_up_on_timeout(s, host, port, fastopen_connect)
                continue
            # Blocking: a timeout would make the fd non-blocking and MSG_FASTOPEN
            # would return EINPROGRESS when it has to request a cookie first.
            if plain:
                s.connect((host, port))
                s.sendall(b"hello")
            elif fastopen_connect:
                s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                s.connect((host, port))
                s.sendall(b"hello")
            else:
                s.sendto(b"hello", socket.MSG_FASTOPEN, (host, port))
            s.settimeout(1 if unanswered else 10)
            try:
                answered = bool(s.recv(16))
            except TimeoutError:
                if not unanswered:
                    raise
                answered = False
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            options, fail = tcp_info(s)
            row = {"acked": bool(options & TCPI_OPT_SYN_DATA), "client_fail": fail}
            print(json.dumps(row | ({"answered": answered} if unanswered else {})), flush=True)
            if hold:
                sys.stdin.read()
        finally:
            s.close()


def syn_hold(host: str, port: int, count: int) -> None:
    """SYNs with data whose SYN-ACKs the test drops: the server keeps each TFO child in
    SYN_RECV, filling its TFO queue. Closed before the second SYN timeout, so the client's
    blackhole detection (TCPFastOpenActiveFail) never runs."""
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            sent = s.sendto(b"hello", socket.MSG_FASTOPEN, (host, port))
        except BlockingIOError:  # EINPROGRESS: no cookie cached, the SYN carried none
            sent = 0
        held.append(s)
        print(json.dumps({"syn_data": sent > 0}), flush=True)
        time.sleep(0.2)  # the server handles each SYN before the next one
    time.sleep(0.3)
    for s in held:
        s.close()


def wait_for_time_wait(local_port: int, timeout: float = 10) -> bool:
    """Until /proc/net/tcp (this namespace) shows our local port in TIME-WAIT (state 06)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:
            for row in table.readlines()[1:]:
                fields = row.split()
                if int(fields[1].split(":")[1], 16) == local_port and fields[3] == "06":
                    return True
        time.sleep(0.05)
    return False


def tw_bind_reuse(host: str, port: int) -> None:
    """Close first (TIME-WAIT on our side), then reconnect from the same local port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # The TIME-WAIT socket inherits SO_REUSEADDR; bind() over it needs it on both.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.connect((host, port))
    s.sendall(b"x")
    s.recv(16)
    local = s.getsockname()
    s.close()
    # Only a socket already in TIME-WAIT goes through tcp_twsk_unique(); under emulation the
    # FIN exchange can take longer than any fixed sleep.
    if not wait_for_time_wait(local[1]):
        print(json.dumps({"reused": False, "error": "never reached TIME-WAIT"}), flush=True)
        return
    s2 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s2.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s2.bind(local)
    try:
        s2.connect((host, port))
        s2.sendall(b"y")
        s2.recv(16)
        print(json.dumps({"reused": True, "local_port": local[1]}), flush=True)
    except OSError as exc:
        print(json.dumps({"reused": False, "error": exc.strerror}), flush=True)
    finally:
        s2.close()


def tw_ephemeral(host: str, port: int) -> None:
    """With a one-port ip_local_port_range: close first, then reconnect until the kernel
    lets the new connection take over the TIME-WAIT socket (needs tcp_tw_reuse=1)."""
    # Before 6.14 the kernel ages TIME-WAIT sockets in whole CLOCK_MONOTONIC seconds: start
    # just after a second begins, so the first retry is refused (same second) on every kernel.
    time.sleep(1 - time.monotonic() % 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    s.sendall(b"x")
    s.recv(16)
    local_port = s.getsockname()[1]
    s.close()
    closed = time.monotonic()
    # Until then the old socket is in FIN_WAIT2, which refuses the 4-tuple without any
    # TIME-WAIT decision: only count refusals by a TIME-WAIT socket.
    if not wait_for_time_wait(local_port):
        print(json.dumps({"refused": 0, "granted_after_s": None, "error": "never reached TIME-WAIT"}),
              flush=True)
        return
    refused = 0
    while time.monotonic() - closed < 10:
        s2 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s2.connect((host, port))
        except OSError:  # EADDRNOTAVAIL: the only port is held by the TIME-WAIT socket
            refused += 1
            s2.close()
            time.sleep(0.25)
            continue
        s2.sendall(b"y")
        s2.recv(16)
        s2.close()
        print(json.dumps({"refused": refused, "granted_after_s": time.monotonic() - closed}),
              flush=True)
        return
    print(json.dumps({"refused": refused, "granted_after_s": None}), flush=True)


def connect_fail(host: str, port: int, count: int) -> None:
    """COUNT plain connects, each expected to fail; one JSON line per attempt: {errno}."""
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.connect((host, port))
                print(json.dumps({"errno": None}), flush=True)
            except OSError as exc:
                print(json.dumps({"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}), flush=True)


def in_flight_listener(port: int) -> None:
    lst = listener(port, 16)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    socket.send_fds(here, [b"x"], [lst.fileno()])  # unread: the socket lives in `there`'s queue
    lst.close()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
    here.close()
    there.close()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("server")
    sv.add_argument("ports", nargs="+")
    sv.add_argument("--log", required=True)
    sv.add_argument("--v6", action="store_true")
    cl = sub.add_parser("client")
    cl.add_argument("host")
    cl.add_argument("port", type=int)
    cl.add_argument("count", type=int)
    cl.add_argument("--comm")
    cl.add_argument("--plain", action="store_true")
    cl.add_argument("--hold", action="store_true")
    cl.add_argument("--fastopen-connect", action="store_true")
    cl.add_argument("--give-up-on-timeout", action="store_true")
    cl.add_argument("--unanswered", action="store_true")
    sh = sub.add_parser("syn-hold")
    sh.add_argument("host")
    sh.add_argument("port", type=int)
    sh.add_argument("count", type=int)
    sh.add_argument("--comm")
    for name in ("tw-bind-reuse", "tw-ephemeral"):
        tw = sub.add_parser(name)
        tw.add_argument("host")
        tw.add_argument("port", type=int)
        tw.add_argument("--comm")
    sub.add_parser("in-flight-listener").add_argument("port", type=int)
    cf = sub.add_parser("connect-fail")
    cf.add_argument("host")
    cf.add_argument("port", type=int)
    cf.add_argument("count", type=int)
    cf.add_argument("--comm")
    a = p.parse_args()
    if getattr(a, "comm", None):
        set_comm(a.comm)
    if a.cmd == "server":
        serve(a.ports, a.log, a.v6)
    elif a.cmd == "client":
        client(a.host, a.port, a.count, a.plain, a.hold, a.fastopen_connect, a.give_up_on_timeout,
               a.unanswered)
    elif a.cmd == "syn-hold":
        syn_hold(a.host, a.port, a.count)
    elif a.cmd == "connect-fail":
        connect_fail(a.host, a.port, a.count)
    elif a.cmd == "in-flight-listener":
        in_flight_listener(a.port)
    elif a.cmd == "tw-bind-reuse":
        tw_bind_reuse(a.host, a.port)
    else:
        tw_ephemeral(a.host, a.port)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
