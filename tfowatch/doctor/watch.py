"""`tfowatch doctor`: survey every namespace (optionally across a watch window on the
same probe plan as `run`), apply the rules, and report findings for people or machines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tfowatch.core import netns
from tfowatch.core.kernel import hz_unknown
from tfowatch.core.nsconfig import TFO_ALL_LISTENERS, TFO_CLIENT, TFO_SERVER, tfo_flags
from tfowatch.doctor.findings import SEVERITIES, Finding, View, endpoint, evaluate
from tfowatch.doctor.listeners import TFO_QLEN_SOURCE
from tfowatch.doctor.observe import Observation
from tfowatch.doctor.survey import NamespaceSurvey, survey


@dataclass
class Report:
    namespaces: dict[int, NamespaceSurvey]
    findings: list[Finding]
    watch: Observation | None = None
    probe_tier: str = ""
    notes: list[str] = field(default_factory=list)
    before: dict[int, NamespaceSurvey] = field(default_factory=dict)  # at the watch's start

    @property
    def worst(self) -> str | None:
        levels = [SEVERITIES.index(f.severity) for f in self.findings]
        return SEVERITIES[max(levels)] if levels else None


Surveys = dict[int, NamespaceSurvey]


Announce = Callable[[str], None]


def watch(seconds: float, only: set[int] | None, mode: str, stop: threading.Event,
          announce: Announce) -> tuple[Surveys, Surveys, Observation]:
    """Survey, observe for `seconds` with the probes, survey again."""
    from tfowatch.core.events import Event
    from tfowatch.core.pipeline import Pipeline
    from tfowatch.core.plan import Variant

    obs = Observation()

    def keep(ev: Event) -> bool:
        return only is None or ev.netns in only

    pipe = Pipeline(mode=mode, keep=keep, sink=obs.add, variant=Variant(plain_connects=True))
    try:
        before = survey(only)
        announce(f"watching for {seconds:g} s ({pipe.plan.tier} tier)")
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < seconds:
            pipe.poll_once()
        pipe.drain()
        obs.seconds = round(time.monotonic() - started, 1)
        obs.tier = pipe.plan.tier
        obs.degraded = pipe.plan.degraded.describe(obs.tier) if pipe.plan.degraded else ""
        obs.untimed = hz_unknown(pipe.facts) if pipe.probes is not None else ""
        obs.lost = pipe.agg.snapshot().lost
        obs.unwatched = [str(u) for u in pipe.probes.unwatched] if pipe.probes is not None else []
        return before, survey(only), obs
    finally:
        pipe.close()


def diagnose(only: set[int] | None = None, seconds: float | None = None, mode: str = "auto",
             stop: threading.Event | None = None, announce: Announce = lambda _: None) -> Report:
    own = netns.self_netns()
    if seconds:
        before, now, obs = watch(seconds, only, mode, stop or threading.Event(), announce)
    else:
        before, now, obs = {}, survey(only), None
    findings = []
    for ino, ns in sorted(now.items()):
        findings += evaluate(View(now=ns, before=before.get(ino), obs=obs, own=ino == own))
    report = Report(namespaces=now, findings=findings, watch=obs, probe_tier=obs.tier if obs else "",
                    before=before)
    if obs and obs.degraded:
        report.notes.append(f"DEGRADED: {obs.degraded}")
    if obs and obs.tier == "sockops":
        report.notes.append("watched in the sockops tier: TIME-WAIT takeovers but no refusals (those "
                            "need kprobes); connects failing with EADDRNOTAVAIL are seen")
    elif obs and obs.tier != "kprobe":
        report.notes.append(f"watched in the {obs.tier} tier: no per-port server events and no "
                            "TIME-WAIT decisions (those need kprobes)")
    if obs and obs.unwatched:
        names = "; ".join(obs.unwatched)
        report.notes.append(f"UNWATCHED: {len(obs.unwatched)} listeners open before the watch: their "
                            f"cookie requests, cookies and fallbacks are not seen: {names}")
    if obs and obs.untimed:
        report.notes.append(obs.untimed)
    if obs and obs.lost:
        report.notes.append(f"{obs.lost} events were lost during the watch: counts are low")
    return report


TCPEXT_SHOWN = ("TCPFastOpen", "TW")


def tcpext_summary(ns: NamespaceSurvey, before: NamespaceSurvey | None) -> dict[str, object]:
    """The namespace's TFO and TIME-WAIT counters: since it started (as the kernel keeps them),
    and over the watch window when there was one."""
    shown = {k: v for k, v in sorted(ns.tcpext.items()) if k.startswith(TCPEXT_SHOWN)}
    out: dict[str, object] = {"tcpext": shown, "tcpext_since": "namespace_start"}
    if before is not None:
        out["tcpext_window"] = {k: v - before.tcpext.get(k, 0) for k, v in shown.items()}
    return out


def namespace_summary(ns: NamespaceSurvey, before: NamespaceSurvey | None = None) -> dict[str, object]:
    cfg = ns.config
    return cfg.as_dict() | tcpext_summary(ns, before) | {
        "tcp_tw_reuse_delay_ms": cfg.number("tcp_tw_reuse_delay"),
        "tcp_timestamps": cfg.number("tcp_timestamps"),
        "ip_local_port_range": cfg.raw.get("ip_local_port_range"),
        "key": {"set": ns.key.set, "fingerprint": ns.key.fingerprint, "backup": ns.key.backup},
        "listeners": [{"port": lst.port, "comms": sorted(lst.comms), "pids": sorted(lst.pids),
                       "tfo_qlen": lst.tfo_qlen} for lst in ns.listeners],
        "listeners_from": "sock_diag", "tfo_qlen_from": TFO_QLEN_SOURCE,
        "time_wait": sum(ns.time_wait.values()),
        "time_wait_by_destination": {endpoint(a, p): n for (a, p), n in ns.time_wait.most_common(100)},
        "tfo_servers_cached": sorted(a for a, p in ns.peers.items() if p.cookie),
    }


def as_json(report: Report) -> str:
    return json.dumps({
        "worst": report.worst, "watch_seconds": report.watch.seconds if report.watch else None,
        "probe_tier": report.probe_tier or None, "notes": report.notes,
        "findings": [f.as_dict() for f in report.findings],
        "namespaces": [namespace_summary(ns, report.before.get(ino))
                       for ino, ns in sorted(report.namespaces.items())],
    }, indent=2)


CLIENT_MEANING = {True: "clients send SYN data", False: "clients never send SYN data"}
SERVER_MEANING = {True: "listeners with TCP_FASTOPEN accept SYN data",
                  False: "no listener accepts SYN data"}


def _describe(ns: NamespaceSurvey) -> list[str]:
    cfg = ns.config
    bits = cfg.tcp_fastopen or 0
    flags = tfo_flags(bits)
    server = SERVER_MEANING[bool(bits & TFO_SERVER)]
    if bits & TFO_ALL_LISTENERS:
        server = "every listener accepts SYN data (0x400), TCP_FASTOPEN or not"
    tfo_listeners = [f"{lst.port}" for lst in ns.listeners if lst.tfo_qlen]
    plain = [f"{lst.port}" for lst in ns.listeners if lst.tfo_qlen == 0]
    unknown = [f"{lst.port}" for lst in ns.listeners if lst.tfo_qlen is None]
    key = "not set yet"
    if ns.key.set:
        key = f"fingerprint {ns.key.fingerprint}" + (" + backup" if ns.key.backup else "")
    return [
        f"namespace {cfg.name} (netns {cfg.netns})",
        f"  tcp_fastopen={bits:#x} [{', '.join(flags) or 'off'}]: "
        f"{CLIENT_MEANING[bool(bits & TFO_CLIENT)]}; {server}",
        f"  key: {key}; blackhole timeout {cfg.blackhole_timeout_s} s",
        f"  listeners with TFO: {', '.join(tfo_listeners) or 'none'}; without: {', '.join(plain) or 'none'}"
        + (f"; unknown (no process holds them): {', '.join(unknown)}" if unknown else ""),
        f"  TIME-WAIT sockets {sum(ns.time_wait.values())}; tcp_tw_reuse={cfg.tw_reuse} "
        f"timestamps={cfg.number('tcp_timestamps')} ports {cfg.raw.get('ip_local_port_range', '?')}",
    ]


def as_text(report: Report, verbose: bool = False) -> str:
    lines: list[str] = []
    with_findings = {f.netns for f in report.findings}
    for ino, ns in sorted(report.namespaces.items()):
        if verbose or ino in with_findings:
            lines += _describe(ns)
            for f in (f for f in report.findings if f.netns == ino):
                lines.append(f"  {f.severity.upper():<8} {f.summary}")
                lines.append(f"           evidence: {json.dumps(f.evidence)}")
                lines.append(f"           fix: {f.fix}")
            lines.append("")
    lines += [f"note: {n}" for n in report.notes]
    counts = {s: sum(f.severity == s for f in report.findings) for s in SEVERITIES}
    watched = f", watched {report.watch.seconds:g} s ({report.probe_tier} tier)" if report.watch else ""
    lines.append(f"{len(report.namespaces)} namespaces checked{watched}: "
                 + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
