"""Generate tfowatch.json beside this file:
`python monitoring/dashboards/build.py > monitoring/dashboards/tfowatch.json`.

Dashboards as code with plain dicts (Grafana's JSON model, schemaVersion 41). The tests
check the committed JSON equals this output, check its structure, and run every query
against a real Prometheus scraping tfowatch.
"""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance",netns=~"$netns"'
PORT = 'port=~"$port"'
COMM = 'comm=~"$comm"'
RATE = "[$__rate_interval]"
Panel = dict[str, Any]


def kernel(counters: str) -> str:
    return f'tfowatch_kernel_tcpext_total{{{SEL},counter=~"{counters}"}}'


def target(expr: str, legend: str, ref: str, instant: bool = False,
           fmt: str = "time_series") -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref,
                         "format": fmt}
    if instant:
        t |= {"instant": True, "range": False}
    return t


def panel(kind: str, title: str, description: str, targets: list[dict[str, Any]],
          unit: str = "short", **extra: Any) -> Panel:
    return {"type": kind, "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {}, **extra}


def ratio_panel(title: str, description: str, probe: tuple[str, str, str], kern: tuple[str, str, str]
                ) -> Panel:
    """probe/kern: (numerator, denominator, legend)."""
    return panel("timeseries", title, description, [
        target(f"{probe[0]} / {probe[1]} >= 0", probe[2], "A"),
        target(f"{kern[0]} / {kern[1]} >= 0", kern[2], "B"),
    ], unit="percentunit")


def srate(metric: str, by: str, sel: str = "") -> str:
    """metric: a name, or a {__name__=~...} selector that the label matchers join."""
    inner = ",".join(x for x in (SEL, sel) if x)
    series = f"{metric[:-1]},{inner}}}" if metric.startswith("{") else f"{metric}{{{inner}}}"
    return f"sum by ({by}) (rate({series}{RATE}))"


def krate(counters: str, by: str = "instance, netns") -> str:
    return f"sum by ({by}) (rate({kernel(counters)}{RATE}))"


def panels() -> list[Panel]:
    server_ratio = ratio_panel(
        "Server TFO success ratio",
        "SYN data accepted ÷ (accepted + fallbacks) per listener port (kprobe tier), and the "
        "kernel's TCPFastOpenPassive ÷ (Passive + PassiveFail + ListenOverflow) per netns (every tier).",
        (srate("tfowatch_syn_data_accepted_total", "instance, netns, port", PORT),
         srate('{__name__=~"tfowatch_syn_data_accepted_total|tfowatch_passive_fallbacks_total"}',
               "instance, netns, port", PORT), "{{instance}} {{netns}} :{{port}}"),
        (krate("TCPFastOpenPassive"),
         krate("TCPFastOpenPassive|TCPFastOpenPassiveFail|TCPFastOpenListenOverflow"),
         "{{instance}} {{netns}} kernel"))
    client_ratio = ratio_panel(
        "Client TFO success ratio",
        "SYN data acked ÷ sent per remote port and process, and the kernel's TCPFastOpenActive ÷ "
        "(Active + ActiveFail) per netns.",
        (srate("tfowatch_syn_data_acked_total", "instance, netns, port, comm", f"{PORT},{COMM}"),
         srate("tfowatch_syn_data_sent_total", "instance, netns, port, comm", f"{PORT},{COMM}"),
         "{{instance}} {{comm}} → :{{port}}"),
        (krate("TCPFastOpenActive"), krate("TCPFastOpenActive|TCPFastOpenActiveFail"),
         "{{instance}} {{netns}} kernel"))
    cookies = panel("timeseries", "Cookies requested vs issued",
                    "Per listener port (kprobe tier); the kernel's TCPFastOpenCookieReqd per netns "
                    "in every tier. Requests with no cookies issued: server TFO is off for that listener.", [
                        target(srate("tfowatch_cookie_requests_total", "instance, netns, port", PORT),
                               "requested {{instance}} :{{port}}", "A"),
                        target(srate("tfowatch_cookies_issued_total", "instance, netns, port", PORT),
                               "issued {{instance}} :{{port}}", "B"),
                        target(krate("TCPFastOpenCookieReqd"),
                               "requested {{instance}} {{netns}} kernel", "C"),
                    ], unit="reqps")
    fallbacks = panel("timeseries", "Fallbacks by reason",
                      "Server and client TFO fallbacks to a normal handshake, by reason; "
                      "kernel fail counters alongside.", [
                          target(srate("tfowatch_passive_fallbacks_total", "instance, reason", PORT),
                                 "server {{reason}} {{instance}}", "A"),
                          target(srate("tfowatch_active_fallbacks_total", "instance, reason",
                                       f"{PORT},{COMM}"),
                                 "client {{reason}} {{instance}}", "B"),
                          target(krate("TCPFastOpenPassiveFail|TCPFastOpenListenOverflow|TCPFastOpenActiveFail",
                                       "instance, counter"), "{{counter}} {{instance}}", "C"),
                      ], unit="ops")
    blackhole = panel("timeseries", "Active TFO blackhole disables",
                      "Times the kernel turned client TFO off after timeouts that look like a middlebox "
                      "dropping SYN data (only when tcp_fastopen_blackhole_timeout_sec > 0).", [
                          target("sum by (instance, netns) (increase(tfowatch_blackhole_disables_total"
                                 f"{{{SEL}}}{RATE}))", "{{instance}} {{netns}}", "A"),
                          target("sum by (instance, netns) "
                                 f"(increase({kernel('TCPFastOpenBlackhole')}{RATE}))",
                                 "{{instance}} {{netns}} kernel", "B"),
                      ])
    tw = panel("timeseries", "TIME-WAIT reuse granted vs refused",
               "connect() taking over a TIME-WAIT 4-tuple, by result and refusal reason (kprobe tier; the "
               "sockops tier sees grants only); connect() failing with EADDRNOTAVAIL (no local port, "
               "every BPF tier); the kernel's TWRecycled and TCPTimeWaitOverflow per netns.", [
                   target(srate("tfowatch_tw_reuse_total", "instance, result, reason", f"{PORT},{COMM}"),
                          "{{result}} {{reason}} {{instance}}", "A"),
                   target(srate("tfowatch_connect_eaddrnotavail_total", "instance, comm", f"{PORT},{COMM}"),
                          "EADDRNOTAVAIL {{comm}} {{instance}}", "C"),
                   target(krate("TWRecycled|TCPTimeWaitOverflow", "instance, counter"),
                          "{{counter}} {{instance}}", "B"),
               ], unit="ops")
    heat = panel("heatmap", "TIME-WAIT socket age at reuse decision",
                 "How old the TIME-WAIT socket was when reuse was granted or refused: refusals below the "
                 "reuse delay (1 s by default) are the too_recent case.", [
                     target(f"sum by (le) (increase(tfowatch_tw_reuse_age_seconds_bucket{{{SEL}}}{RATE}))",
                            "{{le}}", "A", fmt="heatmap"),
                 ], unit="s", options={"calculate": False, "yAxis": {"unit": "s"}})
    per_port = panel("table", "Per listener port (since the range start)",
                     "Server side per (netns, port): SYN data accepted and each fallback.", [
                         target(f"sum by (instance, netns, port) (increase(tfowatch_syn_data_accepted_total"
                                f"{{{SEL},{PORT}}}[$__range]))", "", "A", instant=True, fmt="table"),
                         target("sum by (instance, netns, port, reason) "
                                f"(increase(tfowatch_passive_fallbacks_total{{{SEL},{PORT}}}[$__range]))",
                                "", "B", instant=True, fmt="table"),
                     ])
    per_proc = panel("table", "Per process (since the range start)",
                     "Client side per (netns, remote port, comm): SYN data sent and acked.", [
                         target(f"sum by (instance, netns, port, comm) (increase(tfowatch_syn_data_sent_total"
                                f"{{{SEL},{PORT},{COMM}}}[$__range]))", "", "A", instant=True, fmt="table"),
                         target("sum by (instance, netns, port, comm) (increase(tfowatch_syn_data_acked_total"
                                f"{{{SEL},{PORT},{COMM}}}[$__range]))", "", "B", instant=True, fmt="table"),
                     ])
    degraded = panel("stat", "Degraded tier (nodes running below their planned tier)",
                     "Nodes whose planned tier could not be loaded (tfowatch_tier_degraded, by reason), "
                     "and probes of the plan that are not attached. Anything above 0 means blind spots: "
                     "see the TfowatchTierDegraded runbook.", [
                         target('sum(tfowatch_tier_degraded{instance=~"$instance"}) or vector(0)',
                                "degraded nodes", "A", instant=True),
                         target('count(tfowatch_probe_attached{instance=~"$instance"} == 0) or vector(0)',
                                "probes not attached", "B", instant=True),
                     ], options={"colorMode": "background", "graphMode": "none",
                                 "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
    degraded["fieldConfig"]["defaults"]["thresholds"] = {
        "mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}
    coverage = panel("table", "Probe coverage",
                     "Each probe point, what it is attached to, and whether it is attached (1).", [
                         target('tfowatch_probe_attached{instance=~"$instance"}', "", "A",
                                instant=True, fmt="table"),
                         target('tfowatch_build_info{instance=~"$instance"}', "", "B",
                                instant=True, fmt="table"),
                     ])
    lost = panel("timeseries", "Lost events and dropped series",
                 "Perf-buffer samples lost; events folded into 'other' by the series cap; series "
                 "removed after series_ttl idle; namespaces retired after netns_grace gone, or at "
                 "once when a new namespace took the inode (late: events of one already replaced).", [
                     target('sum by (instance) (rate(tfowatch_events_lost_total{instance=~"$instance"}'
                            f"{RATE}))", "lost {{instance}}", "A"),
                     target('sum by (instance) (rate(tfowatch_events_total{instance=~"$instance"}'
                            f"{RATE}))", "received {{instance}}", "B"),
                     target('sum by (instance) (rate(tfowatch_series_dropped_total{instance=~"$instance"}'
                            f"{RATE}))", "folded into other {{instance}}", "C"),
                     target('sum by (instance) (rate(tfowatch_series_expired_total{instance=~"$instance"}'
                            f"{RATE}))", "series expired {{instance}}", "D"),
                     target('sum by (instance, reason) (rate(tfowatch_netns_retired_total'
                            f'{{instance=~"$instance"}}{RATE}))',
                            "namespaces retired ({{reason}}) {{instance}}", "E"),
                     target('sum by (instance) (rate(tfowatch_netns_late_events_total{instance=~"$instance"}'
                            f"{RATE}))", "late events of a replaced namespace {{instance}}", "F"),
                 ], unit="ops")
    drift = panel("timeseries", "Reconcile drift (probes minus kernel counters)",
                  "Non-zero means the probes and the kernel's TcpExt disagree; see the runbook.", [
                      target(f"tfowatch_reconcile_drift{{{SEL}}}", "{{instance}} {{netns}} {{metric}}", "A"),
                  ])
    return [degraded, server_ratio, client_ratio, cookies, fallbacks, tw, heat, per_port, per_proc,
            coverage, lost, drift, *path_row(blackhole)]


def path_row(blackhole: Panel) -> list[Panel]:
    """What the network path does to TFO: the kernel's blackhole state, and per destination
    port and process the fallbacks that name a middlebox (alerts TFOActiveBlackholeDisabled,
    TFOTimeoutsToDestination, TFOSynDataDropped, TFOCookieNeverReturned)."""
    state = panel("timeseries", "Active TFO disabled now (the kernel's blackhole state)",
                  "1 while the kernel sends no TFO option from the namespace (after suspected "
                  "blackholing), the seconds until it tries TFO again, and its disable count (each "
                  "doubles the next). Absent where tfowatch_kernel_hz is 0; the kernel's "
                  "TCPFastOpenBlackhole total is shown in every tier.", [
                      target(f"max by (instance, netns) (tfowatch_active_tfo_disabled{{{SEL}}})",
                             "disabled {{instance}} {{netns}}", "A"),
                      target(f"max by (instance, netns) (tfowatch_active_tfo_reenable_seconds{{{SEL}}})",
                             "retried in (s) {{instance}} {{netns}}", "B"),
                      target(f"max by (instance, netns) (tfowatch_active_tfo_disable_count{{{SEL}}})",
                             "disable count {{instance}} {{netns}}", "C"),
                      target(f"sum by (instance, netns) ({kernel('TCPFastOpenBlackhole')})",
                             "TCPFastOpenBlackhole {{instance}} {{netns}} kernel", "D"),
                  ])
    per_dest = panel("table", "Per destination: what the path does to TFO (since the range start)",
                     "Client side per (netns, remote port, comm): SYN data sent, and the fallbacks "
                     "that point at the path: cookie_unavailable without SYN data (option stripped, or "
                     "no server TFO), syn_retransmitted (SYN data dropped), tfo_timeout (SYN-ACKs or "
                     "data eaten: blackhole detection), tfo_disabled (sent while the kernel had TFO off).", [
                         target(f"sum by (instance, netns, port, comm) (increase(tfowatch_syn_data_sent_total"
                                f"{{{SEL},{PORT},{COMM}}}[$__range]))", "", "A", instant=True, fmt="table"),
                         target("sum by (instance, netns, port, comm, reason) "
                                f"(increase(tfowatch_active_fallbacks_total{{{SEL},{PORT},{COMM}}}[$__range]))",
                                "", "B", instant=True, fmt="table"),
                     ])
    row = {"type": "row", "title": "Path: middleboxes and blackholes", "collapsed": False, "panels": []}
    return [row, blackhole, state, per_dest]


def layout(ps: list[Panel]) -> list[Panel]:
    """Two panels per line, 12 wide and 8 high; a row header takes a line of its own; ids in order."""
    y, column = 0, 0
    for i, p in enumerate(ps):
        p["id"] = i + 1
        if p["type"] == "row":
            y, column = y + 8 * column, 0  # below a half-filled line
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
            continue
        p["gridPos"] = {"h": 8, "w": 12, "x": 12 * column, "y": y}
        y, column = (y + 8, 0) if column else (y, 1)
    return ps


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"var-{name}", "qryType": 1},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def dashboard() -> dict[str, Any]:
    return {
        "uid": "tfowatch-overview",
        "title": "tfowatch: TCP Fast Open and TIME-WAIT reuse",
        "description": "TFO success, fallbacks by reason, cookies, blackhole disables and TIME-WAIT reuse, "
                       "from tfowatch (https://github.com/tfowatch/tfowatch).",
        "tags": ["tfowatch", "tcp", "tfo"],
        "schemaVersion": 41,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            variable("instance", 'label_values(tfowatch_build_info, instance)', "Instance"),
            variable("netns", 'label_values(tfowatch_kernel_tcpext_total{instance=~"$instance"}, netns)',
                     "Network namespace"),
            variable("port", 'label_values({__name__=~"tfowatch_syn_data_accepted_total|'
                             'tfowatch_syn_data_sent_total",instance=~"$instance"}, port)', "Port"),
            variable("comm", 'label_values(tfowatch_syn_data_sent_total{instance=~"$instance"}, comm)',
                     "Process"),
        ]},
        "panels": layout(panels()),
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2, ensure_ascii=False))
