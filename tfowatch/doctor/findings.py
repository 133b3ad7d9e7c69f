"""`doctor`'s rules: from a namespace's survey (and what a watch window saw) to findings.

Each rule names one cause in plain words, with the numbers that show it and the fix.
Counters are the kernel's TcpExt: over the watch window when there is one, else since
the namespace was created.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from tfowatch.core.events import TFO_ATTEMPTS, EventType
from tfowatch.core.nsconfig import TFO_ALL_LISTENERS, TFO_SERVER, tfo_flags
from tfowatch.doctor.listeners import Listener
from tfowatch.doctor.observe import Observation
from tfowatch.doctor.survey import NamespaceSurvey

SEVERITIES = ("info", "warning", "critical")
EXHAUSTION_SHARE = 0.5  # TIME-WAIT sockets to one destination vs ephemeral ports
UNANSWERED_REQUESTS = 2  # cookie requests a destination left unanswered before it is suspect


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    netns: int
    namespace: str
    summary: str
    evidence: dict[str, object]
    fix: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class View:
    """One namespace as the rules see it."""
    now: NamespaceSurvey
    before: NamespaceSurvey | None = None  # at the start of the watch window
    obs: Observation | None = None
    own: bool = False  # the namespace doctor runs in: no `ip netns exec` in fixes

    def counter(self, name: str) -> int:
        value = self.now.tcpext.get(name, 0)
        return value - self.before.tcpext.get(name, 0) if self.before else value

    @property
    def span(self) -> str:
        return f"in the last {self.obs.seconds:g} s" if self.obs else "since the namespace started"

    def sysctl(self, name: str, value: object) -> str:
        cmd = f"sysctl -w net.ipv4.{name}={value}"
        if self.own:
            return cmd
        if self.now.config.name != str(self.now.netns):  # it has an `ip netns` name
            return f"ip netns exec {self.now.config.name} {cmd}"
        return f"nsenter --net={self.now.handle} {cmd}"

    def finding(self, severity: str, code: str, summary: str, evidence: dict[str, object],
                fix: str) -> Finding:
        return Finding(severity, code, self.now.netns, self.now.config.name, summary, evidence, fix)

    def server_events(self, port: int | None, *types: EventType) -> int:
        """Server events of these types the watch saw at `port` (None: any port here)."""
        if not self.obs:
            return 0
        return sum(seen[t] for (ns, p), seen in self.obs.server.items()
                   if ns == self.now.netns and port in (None, p) for t in types)

    def turned_away(self, port: int | None) -> tuple[int, int]:
        """TFO SYNs a listener with TFO off answered without it (watch only), as (cookie
        requests, SYNs that carried a cookie): server_disabled counts both kinds."""
        requests = self.server_events(port, EventType.COOKIE_REQUEST)
        return requests, max(0, self.server_events(port, EventType.SERVER_DISABLED) - requests)


def endpoint(addr: str, port: int) -> str:
    """ADDR:PORT, [ADDR]:PORT for IPv6."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _listener_text(lst: Listener) -> str:
    return f"{lst.port} ({','.join(sorted(lst.comms)) or '?'})"


def server_tfo_disabled(v: View) -> Iterator[Finding]:
    fastopen = v.now.config.tcp_fastopen or 0
    if fastopen & TFO_SERVER:
        return
    wanting = [lst for lst in v.now.listeners if lst.tfo_qlen]
    asked = v.counter("TCPFastOpenCookieReqd")
    if not wanting and not asked:
        return  # server TFO is off and nothing here wants it
    severity = "warning" if wanting else "info"
    what = (f"listener(s) {', '.join(map(_listener_text, wanting))} set TCP_FASTOPEN"
            if wanting else "no listener sets TCP_FASTOPEN")
    _, stale = v.turned_away(None)
    carried = f", and {stale} carried a cookie issued while it was on" if stale else ""
    accepted = v.counter("TCPFastOpenPassive")
    earlier = (f" ({accepted} TFO connections were accepted {v.span}, while the server bit was on)"
               if accepted else "")
    evidence: dict[str, object] = {
        "tcp_fastopen": hex(fastopen), "TCPFastOpenCookieReqd": asked, "TCPFastOpenPassive": accepted,
        "tfo_listeners": [{"port": lst.port, "comms": sorted(lst.comms), "tfo_qlen": lst.tfo_qlen}
                          for lst in wanting]}
    if v.obs:
        evidence["syns_with_a_cookie"] = stale
    yield v.finding(
        severity, "server_tfo_disabled",
        f"server TFO is off (net.ipv4.tcp_fastopen={fastopen:#x}: "
        f"{', '.join(tfo_flags(fastopen)) or 'nothing'}); {what}; {asked} SYNs asked for a cookie "
        f"{v.span}{carried}: while it is off, no cookie is issued and no SYN data is accepted{earlier}",
        evidence,
        f"{v.sysctl('tcp_fastopen', fastopen | TFO_SERVER)} (adds the server bit 0x2)")


def listener_without_tfo(v: View) -> Iterator[Finding]:
    fastopen = v.now.config.tcp_fastopen or 0
    if not fastopen & TFO_SERVER or fastopen & TFO_ALL_LISTENERS:
        return
    plain = [lst for lst in v.now.listeners if lst.tfo_qlen == 0]
    no_tfo_listener = not any(lst.tfo_qlen for lst in v.now.listeners)
    asked = v.counter("TCPFastOpenCookieReqd")
    for lst in plain:
        requests, cookies = v.turned_away(lst.port)
        per_port = requests + cookies
        if not per_port and not (no_tfo_listener and asked):
            continue  # nobody asked this listener for TFO
        evidence: dict[str, object] = {
            "port": lst.port, "comms": sorted(lst.comms), "pids": sorted(lst.pids), "tfo_qlen": 0,
            "tcp_fastopen": hex(fastopen), "TCPFastOpenCookieReqd": asked}
        if per_port:
            evidence |= {"tfo_syns_to_port": per_port, "cookie_requests_to_port": requests,
                         "syns_with_a_cookie_to_port": cookies}
            seen = (f"{per_port} SYNs to port {lst.port} tried TFO {v.span} ({requests} asked for a "
                    f"cookie, {cookies} carried one)")
        else:
            seen = f"{asked} SYNs asked for a cookie {v.span} and no listener here has TFO"
        yield v.finding(
            "warning", "listener_without_tfo",
            f"listener {_listener_text(lst)} does not set TCP_FASTOPEN: {seen}, "
            "so every client falls back to a full handshake",
            evidence,
            "set TCP_FASTOPEN on the listening socket before listen(): "
            "setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN, 256) (nginx: `listen ... fastopen=256;`), "
            f"or enable TFO on every listener: {v.sysctl('tcp_fastopen', fastopen | TFO_ALL_LISTENERS)}")


def invalid_cookies(v: View) -> Iterator[Finding]:
    failed = v.counter("TCPFastOpenPassiveFail")
    if not failed:
        earlier = v.now.tcpext.get("TCPFastOpenPassiveFail", 0)
        if v.obs and earlier:
            yield v.finding("info", "invalid_cookies_earlier",
                            f"{earlier} SYNs carried an invalid cookie since the namespace "
                            "started, none during the watch",
                            {"TCPFastOpenPassiveFail": earlier}, "none needed now")
        return
    key = v.now.key
    rotated = bool(v.before and v.before.key.fingerprint != key.fingerprint)
    ports = ({port: n[EventType.INVALID_COOKIE] for (ns, port), n in v.obs.server.items()
              if ns == v.now.netns and n[EventType.INVALID_COOKIE]} if v.obs else {})
    evidence: dict[str, object] = {
        "TCPFastOpenPassiveFail": failed, "TCPFastOpenPassive": v.counter("TCPFastOpenPassive"),
        "TCPFastOpenPassiveAltKey": v.counter("TCPFastOpenPassiveAltKey"),
        "key_fingerprint": key.fingerprint, "backup_key": key.backup, "key_changed_during_watch": rotated}
    if ports:
        evidence["invalid_cookies_per_port"] = ports
    yield v.finding(
        "warning", "invalid_cookies",
        f"{failed} SYNs {v.span} carried a TFO cookie no current key accepts: the key changed "
        "(rotated without keeping the old one as backup, or nodes behind one address use "
        "different keys); those clients fell back to a full handshake",
        evidence,
        f"rotate with the old key as backup: {v.sysctl('tcp_fastopen_key', 'NEW,OLD')}; "
        "give every node behind one address the same key "
        f"(compare fingerprints: {key.fingerprint or 'unset'})")


def _timeouts_to(v: View) -> dict[str, int]:
    """destination -> TFO connects from here whose third retransmission timeout the kernel's
    blackhole detection counted (watch only)."""
    if not v.obs:
        return {}
    out: Counter[str] = Counter()
    for key, seen in v.obs.client.items():
        if key.netns == v.now.netns and seen[EventType.TFO_TIMEOUT]:
            out[endpoint(key.daddr, key.port)] += seen[EventType.TFO_TIMEOUT]
    return dict(out)


# The kernel's two reasons to disable client TFO (tcp_fastopen.c): its detection at a TFO
# socket's retransmission timeout, which counts TCPFastOpenActiveFail too, and its check as a
# TFO socket goes, which counts nothing else.
TIMED_OUT = ("a connection that sent a TFO option or SYN data timed out three times in a row (its "
             "SYN-ACKs or data were lost: blackhole detection, TCPFastOpenActiveFail without a SYN-ACK)")
FIN_ALONE = ("a TFO connection closed having received no data but the server's FIN, out of order "
             "(its answer was lost on the path while the FIN got through: the kernel's check as the "
             "socket goes, which counts no TCPFastOpenActiveFail)")


def _blackhole_cause(v: View, disabled: int, timeouts: dict[str, int]) -> str:
    """Which of the kernel's two checks disabled client TFO, as far as the evidence tells."""
    if not v.counter("TCPFastOpenActiveFail"):
        return FIN_ALONE  # the timeout's detection would have counted one each time
    if v.obs and sum(timeouts.values()) >= disabled:
        return TIMED_OUT
    return f"either {TIMED_OUT}, or {FIN_ALONE}"


def blackhole(v: View) -> Iterator[Finding]:
    disabled = v.counter("TCPFastOpenBlackhole")
    timeout = v.now.config.blackhole_timeout_s
    if disabled:
        seen = v.obs.blackholes if v.obs else {}
        where = sorted({endpoint(a, p) for (ns, a, p) in seen if ns == v.now.netns})
        timeouts = _timeouts_to(v)
        yield v.finding(
            "warning", "active_tfo_blackholed",
            f"the kernel disabled client TFO in this namespace {disabled} times {v.span}: "
            f"{_blackhole_cause(v, disabled, timeouts)}; while disabled, no connect here sends a "
            "TFO option, to any destination",
            {"TCPFastOpenBlackhole": disabled, "TCPFastOpenActiveFail": v.counter("TCPFastOpenActiveFail"),
             "blackhole_timeout_s": timeout, "destinations": where, "timeouts_per_destination": timeouts},
            "find what drops the TFO connections' packets on the path to the destinations above "
            "(a firewall that rejects SYNs carrying data, the SYN-ACKs of them, or the answers that "
            f"follow); client TFO comes back {timeout} s after the disable, twice as long after each "
            f"repeat (at most 64 times); {v.sysctl('tcp_fastopen_blackhole_timeout_sec', 0)} turns "
            "detection off")
    for peer in v.now.peers.values():
        if peer.syn_drops:
            yield v.finding(
                "warning", "syn_data_dropped",
                f"SYNs carrying a TFO cookie and data to {peer.address} were lost {peer.syn_drops} "
                "times (the kernel's TCP metrics cache records each): every such connect waited a "
                "retransmission timeout (1 s or more) and sent its SYN again without the data. The "
                "kernel records this but keeps sending SYN data to it, so each TFO connect there "
                "pays it again",
                {"address": peer.address, "fo_syn_drops": peer.syn_drops, "cookie_cached": peer.cookie},
                f"find the firewall or middlebox on the path to {peer.address} that drops SYNs with a "
                f"cookie or data (`tcpdump -ni any 'tcp[tcpflags] & tcp-syn != 0 and host {peer.address}'` "
                "on each hop shows where they stop); until then, connect to it without TFO "
                f"(the application's TCP_FASTOPEN_CONNECT or MSG_FASTOPEN); `ip tcp_metrics delete "
                f"{peer.address}` clears the record")


def cookie_never_returned(v: View) -> Iterator[Finding]:
    """Cookie requests to one destination, none answered with a cookie (watch only)."""
    if not v.obs:
        return
    for key, seen in v.obs.client.items():
        asked = seen[EventType.COOKIE_UNAVAILABLE]
        if key.netns != v.now.netns or asked < UNANSWERED_REQUESTS or seen[EventType.SYN_DATA_SENT]:
            continue  # the first request of any new destination is normal
        peer = v.now.peers.get(key.daddr)
        if peer and peer.cookie:
            continue
        dest = endpoint(key.daddr, key.port)
        yield v.finding(
            "warning", "cookie_never_returned",
            f"{key.comm or '?'} asked {dest} for a TFO cookie {asked} times {v.span} and no SYN-ACK "
            f"carried one (none is cached for {key.daddr}): a middlebox between this host and {dest} "
            "removes the TFO option, or the server does not offer TFO; every connection there "
            "takes a full handshake",
            {"comm": key.comm, "pids": sorted(v.obs.pids[key]), "destination": dest,
             "cookie_requests_sent": asked, "syn_data_sent": 0, "cookie_cached": False},
            "on the server, watch TcpExtTCPFastOpenCookieReqd (`nstat -az TcpExtTCPFastOpenCookieReqd`) "
            "while this client connects: if it grows, the requests arrive and the cookies are removed "
            "on the way back; if not, the option is removed on the way there, or the server's TFO is "
            "off (net.ipv4.tcp_fastopen bit 0x2 and TCP_FASTOPEN on its listener)")


def plain_connects(v: View) -> Iterator[Finding]:
    if not v.obs:
        return
    for key, seen in v.obs.client.items():
        plain = seen[EventType.PLAIN_CONNECT]
        if key.netns != v.now.netns or not plain or any(seen[t] for t in TFO_ATTEMPTS):
            continue
        others = v.obs.tfo_attempts_to(key.netns, key.daddr, key.port)
        peer = v.now.peers.get(key.daddr)
        if not others and not (peer and peer.cookie):
            continue  # nothing says this server speaks TFO
        why = (f"{others} other connections to it from here tried TFO" if others
               else f"a TFO cookie from {key.daddr} is cached here")
        yield v.finding(
            "warning" if others else "info", "plain_connect_to_tfo_server",
            f"{key.comm or '?'} connected {plain} times to {endpoint(key.daddr, key.port)} without TFO, "
            f"though the server offers it ({why}): the application (or its TLS library) opens "
            "the connection itself with connect()",
            {"comm": key.comm, "pids": sorted(v.obs.pids[key]), "destination": endpoint(key.daddr, key.port),
             "plain_connects": plain, "tfo_attempts_by_others": others,
             "cookie_cached": bool(peer and peer.cookie)},
            CLIENT_PROGRAMS.get(key.comm, GENERIC_CLIENT_FIX))


# What is known of programs seen connecting without TFO to servers that offer it (from their
# sources), and what their operator can change; any other program gets the generic fix.
GENERIC_CLIENT_FIX = ("enable TFO in the application: setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1) "
                      "before connect() works under TLS libraries that connect and write themselves; "
                      "or send the first bytes with sendto(MSG_FASTOPEN)")
CLIENT_PROGRAMS = {
    "unbound": "unbound uses client TFO (in a build configured with --enable-tfo-client) only for "
               "upstream queries over plain TCP: it never combines TFO with TLS, so its DoT upstreams "
               "(tls-upstream, forward-tls-upstream) always take a full handshake and no setting "
               "changes that; for plain-TCP upstreams, tcp-upstream: yes with such a build sends TFO",
    "haproxy": "haproxy sends TFO to a server only with `tfo` on its `server` line, only on the first "
               "attempt (not on retries), and only when request data is already waiting at connect "
               "time: health checks and connections opened before the request arrives go without it, "
               "whatever the configuration; add `tfo` where it is missing (and 'retry-on conn-failure "
               "empty-response response-timeout', which its documentation asks for with it)",
}


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def time_wait(v: View) -> Iterator[Finding]:
    cfg = v.now.config
    reuse, stamps = cfg.tw_reuse, cfg.number("tcp_timestamps")
    ports = v.now.port_range
    if ports:
        for (addr, port), n in v.now.time_wait.most_common():
            if n < EXHAUSTION_SHARE * ports:
                break
            blocked = reuse == 0 or (reuse == 2 and not _loopback(addr)) or not stamps
            if not blocked:
                continue
            why = ("TCP timestamps are off" if not stamps else
                   "tcp_tw_reuse=0" if reuse == 0 else "tcp_tw_reuse=2 allows reuse on loopback only")
            yield v.finding(
                "warning", "time_wait_blocks_ports",
                f"{n} TIME-WAIT sockets to {addr}:{port} hold {n} of {ports} ephemeral ports and "
                f"connect() cannot take them over ({why}): new connections to it fail with "
                "EADDRNOTAVAIL until they expire (60 s)",
                {"destination": f"{addr}:{port}", "time_wait": n, "ephemeral_ports": ports,
                 "tcp_tw_reuse": reuse, "tcp_timestamps": stamps},
                (v.sysctl("tcp_timestamps", 1) if not stamps else v.sysctl("tcp_tw_reuse", 1))
                + " (or widen net.ipv4.ip_local_port_range)")
    yield from _tw_refusals(v)


def _tw_refusals(v: View) -> Iterator[Finding]:
    if not v.obs:
        return
    for (ns, addr, port), outcomes in v.obs.time_wait.items():
        refused = {r: n for r, n in outcomes.items() if r != "granted"}
        if ns != v.now.netns or not refused:
            continue
        delay = v.now.config.number("tcp_tw_reuse_delay")
        only_recent = set(refused) == {"too_recent"}
        yield v.finding(
            "info" if only_recent else "warning", "time_wait_reuse_refused",
            f"connect() to {addr}:{port} was refused a TIME-WAIT 4-tuple {sum(refused.values())} times "
            f"{v.span} ({', '.join(f'{r}: {n}' for r, n in sorted(refused.items()))}), "
            f"granted {outcomes['granted']}",
            {"destination": f"{addr}:{port}", "refused": refused, "granted": outcomes["granted"],
             "tcp_tw_reuse": v.now.config.tw_reuse, "tcp_tw_reuse_delay_ms": delay},
            _tw_refusal_fix(v, only_recent, delay))


def _tw_refusal_fix(v: View, only_recent: bool, delay: int | None) -> str:
    if not only_recent:
        return v.sysctl("tcp_tw_reuse", 1) + " and keep net.ipv4.tcp_timestamps=1"
    if delay is not None:  # 6.14+: the age a TIME-WAIT socket needs is tunable
        return f"{v.sysctl('tcp_tw_reuse_delay', 'MS')} (now {delay} ms)"
    return ("with tcp_tw_reuse=1 and timestamps on, a TIME-WAIT socket is reusable 1 s after "
            "its last segment")


def no_local_port(v: View) -> Iterator[Finding]:
    """connect() failing with EADDRNOTAVAIL during the watch, per process and destination."""
    if not v.obs:
        return
    for key, seen in v.obs.client.items():
        failed = seen[EventType.CONNECT_EADDRNOTAVAIL]
        if key.netns != v.now.netns or not failed:
            continue
        held = v.now.time_wait.get((key.daddr, key.port), 0)
        dest = endpoint(key.daddr, key.port)
        yield v.finding(
            "warning", "connect_no_local_port",
            f"{key.comm or '?'}'s connect() to {dest} failed {failed} times {v.span} "
            f"with EADDRNOTAVAIL: no local port was free for it ({held} TIME-WAIT sockets to it now, "
            f"{v.now.port_range or '?'} ephemeral ports)",
            {"comm": key.comm, "pids": sorted(v.obs.pids[key]), "destination": endpoint(key.daddr, key.port),
             "eaddrnotavail": failed, "time_wait": held, "ephemeral_ports": v.now.port_range,
             "tcp_tw_reuse": v.now.config.tw_reuse},
            (v.sysctl("tcp_tw_reuse", 1) + " if the peers use timestamps" if held else
             "widen net.ipv4.ip_local_port_range") + ", or reuse connections (keep-alive, pools)")


def tw_overflow(v: View) -> Iterator[Finding]:
    n = v.counter("TCPTimeWaitOverflow")
    if n:
        limit = v.now.config.number("tcp_max_tw_buckets")
        yield v.finding(
            "info", "time_wait_overflow",
            f"{n} sockets {v.span} closed without TIME-WAIT: tcp_max_tw_buckets ({limit}) was reached",
            {"TCPTimeWaitOverflow": n, "tcp_max_tw_buckets": limit},
            f"none if intended; else {v.sysctl('tcp_max_tw_buckets', 'N')}")


RULES: tuple[Callable[[View], Iterator[Finding]], ...] = (
    server_tfo_disabled, listener_without_tfo, invalid_cookies, blackhole, cookie_never_returned,
    plain_connects,
    time_wait, no_local_port, tw_overflow)


def evaluate(v: View) -> list[Finding]:
    found = [f for rule in RULES for f in rule(v)]
    return sorted(found, key=lambda f: -SEVERITIES.index(f.severity))
