"""Connection load for the benchmarks, run inside a namespace (`ip netns exec NS python load.py`).

  server PORT WORKERS                  WORKERS processes, each with its own SO_REUSEPORT
                                       listener (TCP_FASTOPEN on): read, answer, wait for the
                                       client's close; each prints "ready" once it listens
  client ADDR PORT WORKERS SECONDS     WORKERS processes connecting in a loop for SECONDS, with
         [--rate N] [--plain]          SYN data (MSG_FASTOPEN) unless --plain; at N connections/s
                                       in all when --rate is given, else as fast as they can

  spray ADDR FIRST COUNT               one SYN with data to each of COUNT closed ports from FIRST
                                       on: every port a new label value (series) in tfowatch

Clients end each connection with a reset (SO_LINGER 0), so no side keeps TIME-WAIT sockets:
at ~20k connections/s, 4-tuples held in TIME-WAIT by the server made SYNs of reused ports
time out and the rate collapse to under 1k/s after the first 200k connections.

The client prints one JSON line: {"conns", "errors", "seconds"}, counted between a common
start and end time, so worker start-up is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import time

TCP_FASTOPEN = 23
PAYLOAD = b"GET / HTTP/1.0\r\n\r\n"


def serve(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 4096)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    os.write(1, b"ready\n")  # one write: the workers share the pipe, print() may split it
    while True:
        conn, _ = ls.accept()
        with contextlib.suppress(OSError):  # the client's reset may come at any time
            conn.recv(256)
            conn.sendall(b"ok")
            conn.recv(16)
        conn.close()


LINGER_RESET = struct.pack("ii", 1, 0)
RECV_TIMEOUT = struct.pack("ll", 5, 0)  # a timeout that keeps the socket blocking (MSG_FASTOPEN)


def connect_once(addr: tuple[str, int], plain: bool) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, RECV_TIMEOUT)
    try:
        if plain:
            s.connect(addr)
            s.sendall(PAYLOAD)
        else:
            s.sendto(PAYLOAD, socket.MSG_FASTOPEN, addr)
        s.recv(16)
    finally:
        s.close()


def work(addr: tuple[str, int], plain: bool, start: float, end: float, rate: float,
         out: int) -> None:
    conns = errors = 0
    interval = 1.0 / rate if rate else 0.0
    due = start
    while (now := time.monotonic()) < end:
        if interval:
            if now < due:
                time.sleep(due - now)
            due += interval
        try:
            connect_once(addr, plain)
        except OSError:
            errors += 1
            continue
        if time.monotonic() >= start:
            conns += 1
    os.write(out, json.dumps({"conns": conns, "errors": errors}).encode() + b"\n")


def client(args: argparse.Namespace) -> None:
    addr = (args.addr, args.port)
    connect_once(addr, args.plain)  # the first TFO connection fetches the cookie
    start = time.monotonic() + 0.3
    end = start + args.seconds
    rd, wr = os.pipe()
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(rd)
            work(addr, args.plain, start, end, args.rate / args.workers, wr)
            os._exit(0)
        children.append(pid)
    os.close(wr)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(rd) as results:
        rows = [json.loads(line) for line in results]
    print(json.dumps({"conns": sum(r["conns"] for r in rows), "errors": sum(r["errors"] for r in rows),
                      "seconds": args.seconds}), flush=True)


def spray(addr: str, first: int, count: int) -> None:
    for port in range(first, first + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(OSError):  # EINPROGRESS or refused: the SYN went out
            s.sendto(PAYLOAD, socket.MSG_FASTOPEN, (addr, port))
        s.close()
    print(json.dumps({"ports": count}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("server")
    sv.add_argument("port", type=int)
    sv.add_argument("workers", type=int)
    cl = sub.add_parser("client")
    cl.add_argument("addr")
    cl.add_argument("port", type=int)
    cl.add_argument("workers", type=int)
    cl.add_argument("seconds", type=float)
    cl.add_argument("--rate", type=float, default=0.0)
    cl.add_argument("--plain", action="store_true")
    sp = sub.add_parser("spray")
    sp.add_argument("addr")
    sp.add_argument("first", type=int)
    sp.add_argument("count", type=int)
    args = p.parse_args()
    if args.cmd == "spray":
        spray(args.addr, args.first, args.count)
    elif args.cmd == "server":
        for _ in range(args.workers - 1):
            if os.fork() == 0:
                break
        serve(args.port)
    else:
        client(args)


if __name__ == "__main__":
    main()
