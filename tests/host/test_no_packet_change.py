"""tfowatch never changes a packet: the sockops tier asks for the listener's SYN-ACK callback,
where a program could reserve and write TCP header options. The same TFO exchanges (a cookie
request, then data in the SYN) are captured with tcpdump in the server namespace without the
daemon and with it, and their SYN, SYN-ACK and first data segment of each side must be byte
for byte the same, apart from what differs between any two connections (ports, sequence
numbers, IP id, checksums, timestamp values)."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Host, Lab, free_port, scrape, sh, skip_unless_root_bpf, start_daemon, unit_caps, value

PORT = 7651
KEY = "a1b2c3d4-00000001-00000002-00000003"  # the same cookie for the client in both captures
TCP_TIMESTAMP = 8

Segment = tuple[bool, int, int, bytes, bytes, int]  # from client, flags, window, options, payload, ip tos/ttl


@pytest.fixture
def lab() -> Iterator[Lab]:
    skip_unless_root_bpf("packet capture test", "tcpdump")
    hosts = Lab()
    try:
        yield hosts
    finally:
        hosts.close()


def veth_of(host: Host) -> str:
    line = sh("ip", "-n", host.name, "-o", "link", "show", "type", "veth").stdout.splitlines()[0]
    return line.split(":")[1].strip().split("@")[0]


def capture(lab: Lab, srv: Host, addr: str, out: Path) -> None:
    """The client's two exchanges, its TFO cookie cache emptied first, captured at the server."""
    sh("ip", "-n", lab.client.name, "tcp_metrics", "flush", "all")
    tcpdump = ["tcpdump", "-i", veth_of(srv), "--immediate-mode", "-U", "-n", "-w", str(out),
               f"tcp port {PORT}"]  # --immediate-mode: else a packet waits for its block's timeout
    dump = subprocess.Popen(["ip", "netns", "exec", srv.name, *tcpdump], stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        assert "listening on" in dump.stderr.readline()
        rows = lab.client.peer("client", addr, str(PORT), "2", "--comm", "capture")
        assert [r["acked"] for r in rows] == [False, True]  # a cookie request, then data in the SYN
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)


def segments(pcap: Path, client: str) -> list[list[Segment]]:
    """Per connection (in order), its SYN, SYN-ACK and first data segment of each side, each
    with what two connections of the same exchange share."""
    raw = pcap.read_bytes()
    assert struct.unpack_from("<I", raw)[0] == 0xA1B2C3D4 and struct.unpack_from("<I", raw, 20)[0] == 1
    conns: dict[int, list[Segment]] = {}
    pos = 24
    while pos < len(raw):
        caplen = struct.unpack_from("<I", raw, pos + 8)[0]
        frame = raw[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        src = ".".join(map(str, ip[12:16]))
        tcp = ip[ihl:struct.unpack_from("!H", ip, 2)[0]]
        sport, dport = struct.unpack_from("!HH", tcp)
        off, flags, window = tcp[12] >> 4, tcp[13], struct.unpack_from("!H", tcp, 14)[0]
        from_client = src == client
        conn = conns.setdefault(sport if from_client else dport, [])
        payload = tcp[off * 4:]
        keep = flags & 0x02 or (payload and not any(s[0] == from_client and s[4] for s in conn))
        if keep:
            conn.append((from_client, flags, window, timestamps_zeroed(tcp[20:off * 4]), payload,
                         ip[1] << 8 | ip[8]))
    return list(conns.values())


def timestamps_zeroed(options: bytes) -> bytes:
    out, i = bytearray(options), 0
    while i < len(out) and out[i] != 0:
        if out[i] == 1:
            i += 1
            continue
        kind, length = out[i], out[i + 1]
        if kind == TCP_TIMESTAMP:
            out[i + 2:i + length] = bytes(length - 2)
        i += max(length, 2)
    return bytes(out)


def test_sockops_changes_no_byte_of_a_tfo_exchange(lab: Lab, tmp_path: Path) -> None:
    srv, addr = lab.server("s", "3")
    srv.sysctl("net.ipv4.tcp_fastopen_key", KEY)
    lab.start_server(srv, str(PORT))
    client = next(a for a in (sh("ip", "-n", lab.client.name, "-4", "-o", "addr").stdout.split())
                  if a.startswith("10.")).split("/")[0]
    capture(lab, srv, addr, tmp_path / "without.pcap")
    listen = f"127.0.0.1:{free_port()}"
    daemon = start_daemon(listen, unit_caps(), "--mode", "sockops")
    try:
        capture(lab, srv, addr, tmp_path / "with.pcap")
        samples = scrape(f"http://{listen}/metrics")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    # The program did see these SYN-ACKs (the listener was open before it: adopted).
    assert value(samples, "tfowatch_cookie_requests_total", netns=srv.inode, port=PORT) == 1
    assert value(samples, "tfowatch_syn_data_accepted_total", netns=srv.inode, port=PORT) == 1
    without = segments(tmp_path / "without.pcap", client)
    with_daemon = segments(tmp_path / "with.pcap", client)
    # cookie request: SYN, SYN-ACK, the client's data, the reply; TFO: SYN with data, SYN-ACK, the reply
    assert [len(c) for c in without] == [4, 3], without
    assert with_daemon == without
