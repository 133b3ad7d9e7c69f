"""Hostile load for the soak test, run inside a test namespace.

  flood ADDR PORT RATE     raw SYNs from random addresses in 198.18.0.0/15 and random ports,
                           half of them with a TFO option carrying a random (invalid) cookie
  spray ADDR RATE          MSG_FASTOPEN connects to random ports of ADDR: every one a new
                           `port` label value, to push the daemon's series cap

Both run until killed; errors of single packets or connects are ignored on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import struct
import time

TFO_OPTION = 34


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def syn(src: bytes, dst: bytes, sport: int, dport: int, cookie: bytes | None) -> bytes:
    options = struct.pack("!BBH", 2, 4, 1460)  # MSS
    if cookie is not None:
        options += struct.pack("!BB", TFO_OPTION, 2 + len(cookie)) + cookie + b"\1\1"  # NOP NOP
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, offset << 4, 0x02,
                      64240, 0, 0) + options
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64,
                     socket.IPPROTO_TCP, 0, src, dst)
    return ip + tcp


class Pacer:
    """tick() once per item: sleeps so that items go out at `rate` per second."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.due = time.monotonic()

    def tick(self) -> None:
        self.due = max(self.due, time.monotonic() - 1.0) + self.interval
        delay = self.due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def flood(addr: str, port: int, rate: float) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst = socket.inet_aton(addr)
    pacer = Pacer(rate)
    while True:
        src = struct.pack("!I", (198 << 24 | 18 << 16) + random.getrandbits(17))
        cookie = os.urandom(8) if random.random() < 0.5 else None
        with contextlib.suppress(OSError):  # e.g. ENOBUFS: the flood is best effort
            raw.sendto(syn(src, dst, random.randint(1024, 65535), port, cookie), (addr, 0))
        pacer.tick()


def spray(addr: str, rate: float) -> None:
    pacer = Pacer(rate)
    while True:
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(OSError):  # EINPROGRESS or refused: the SYN went out
            s.sendto(b"x", socket.MSG_FASTOPEN, (addr, random.randint(20000, 60000)))
        time.sleep(0.05)
        s.close()
        pacer.tick()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood")
    f.add_argument("addr")
    f.add_argument("port", type=int)
    f.add_argument("rate", type=float)
    s = sub.add_parser("spray")
    s.add_argument("addr")
    s.add_argument("rate", type=float)
    args = p.parse_args()
    if args.cmd == "flood":
        flood(args.addr, args.port, args.rate)
    else:
        spray(args.addr, args.rate)


if __name__ == "__main__":
    main()
