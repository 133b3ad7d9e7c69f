"""A real Prometheus (Debian's) on loopback with the project's rules, scraping a running
tfowatch while TFO traffic with a key-rotation fallback spike runs in test namespaces.
Every dashboard query must run without error and every panel must return data; the
fallback-spike alerts must be pending or firing in Prometheus' alerts API."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netlab import Host, Lab, free_port, planned_plan, skip_unless_root_bpf, start_daemon, unit_caps

from tfowatch.core.metrics import PROBE_METRICS

ROOT = Path(__file__).parents[2]
RULES = ROOT / "monitoring" / "rules" / "tfowatch.rules.yml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "tfowatch.json"
PORT = 7301
VARS = {"$instance": ".*", "$netns": ".*", "$port": ".*", "$comm": ".*",
        "$__rate_interval": "1m", "$__range": "5m"}


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as exc:  # a bad query: say which and why
        raise AssertionError(f"{params}: {exc.read().decode()}") from exc
    assert body["status"] == "success", body
    return body["data"]


def with_vars(expr: str) -> str:
    for var, value in VARS.items():
        expr = expr.replace(var, value)
    return expr


@dataclass
class Stack:
    prom: str
    server: Host
    client: Host
    tier_metrics: set[str]  # what the daemon's running tier provides
    planned_tier: str  # what `tfowatch probes` resolves on this kernel
    running_tier: str
    at: str  # when Prometheus held the whole run: panels are evaluated then, not after the
    # queries' own minutes in a VM lab guest, when a 1m rate() of the run has gone to 0/0
    spike_at: str  # when the key-rotation spike began


def start_prometheus(target: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    listen = f"127.0.0.1:{free_port()}"
    config = workdir / "prometheus.yml"
    config.write_text(
        # A scrape may take over 1 s in a TCG guest; a failed one marks every series stale.
        "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        f"scrape_configs: [{{job_name: tfowatch, static_configs: [{{targets: ['{target}']}}]}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--web.listen-address={listen}",
                             f"--storage.tsdb.path={workdir / 'data'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{listen}/-/ready", timeout=2)
            return proc, f"http://{listen}"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("prometheus did not become ready")


def wait_for(check: Any, what: str, timeout: float = 90, diagnose: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}" + (f": {diagnose()}" if diagnose else ""))


def held_at_once(prom: str, query: str) -> tuple[str, dict[str, Any]] | None:
    """(a moment, build_info then) when `query` holds, or None. The moment is the timestamp of
    the last good scrape, not "now": a failed scrape (a slow guest) marks every series stale
    from the time it *started*, so a scrape still in flight at "now" can later make "now"
    empty. Evaluated at a good scrape's own timestamp, nothing later can change the answer."""
    ups = api(prom, "query", query='up{job="tfowatch"}[1m]')["result"]
    good = [ts for ts, value in (ups[0]["values"] if ups else []) if value == "1"]
    if not good:
        return None
    at = f"{good[-1]:.3f}"
    info = api(prom, "query", query='tfowatch_build_info{job="tfowatch"}', time=at)["result"]
    return (at, info[0]) if info and api(prom, "query", query=query, time=at)["result"] else None


def scrapes(prom: str) -> Any:
    """What Prometheus saw of its scrapes: for a timeout's message."""
    def said() -> str:
        def over(fn: str, series: str) -> str:
            res = api(prom, "query", query=f'{fn}_over_time({series}{{job="tfowatch"}}[10m])')["result"]
            return res[0]["value"][1] if res else "none"
        return (f"scrapes in 10 min: {over('count', 'up')}, of which good: {over('sum', 'up')}, "
                f"slowest: {over('max', 'scrape_duration_seconds')} s")
    return said


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    skip_unless_root_bpf("prometheus e2e", "prometheus")
    lab = Lab()
    procs: list[subprocess.Popen[Any]] = []
    work = tempfile.TemporaryDirectory(prefix="tfowatch-prom-")
    try:
        srv, addr = lab.server("s", "3")
        lab.start_server(srv, str(PORT))
        listen = f"127.0.0.1:{free_port()}"
        procs.append(start_daemon(listen, unit_caps("sys-admin.conf")))
        prom_proc, prom = start_prometheus(listen, Path(work.name))
        procs.append(prom_proc)
        wait_for(lambda: api(prom, "query", query='up{job="tfowatch"} == 1')["result"], "the first scrape")
        lab.client.peer("client", addr, str(PORT), "3", "--comm", "e2e")  # cookie, then accepted
        reused = lab.client.peer("tw-bind-reuse", addr, str(PORT))  # for the age heatmap
        assert reused and reused[0]["reused"], f"no TIME-WAIT reuse for the heatmap: {reused}"
        time.sleep(3)  # a clean stretch before the spike
        spike_at = f"{time.time():.3f}"
        for i in range(4):  # key rotation spike: each rotation invalidates the client's cookie
            srv.sysctl("net.ipv4.tcp_fastopen_key", f"{i + 1:08x}-a1b2c3d4-a1b2c3d4-a1b2c3d4")
            lab.client.peer("client", addr, str(PORT), "2", "--comm", "e2e")
        # Until Prometheus holds the spike's final counts.
        fail = f'tfowatch_kernel_tcpext_total{{counter="TCPFastOpenPassiveFail",netns="{srv.inode}"}} >= 4'
        at, info = wait_for(lambda: held_at_once(prom, fail), "the spike in Prometheus",
                            diagnose=scrapes(prom))
        print(f"prometheus: {scrapes(prom)()}")
        plan = planned_plan()
        # The tier the daemon runs, which may be lower than the plan if an attach failed.
        running = info["metric"]["tier"]
        yield Stack(prom=prom, server=srv, client=lab.client, tier_metrics=set(plan["tiers"][running]),
                    planned_tier=plan["tier"], running_tier=running, at=at, spike_at=spike_at)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        lab.close()
        work.cleanup()


def test_every_panel_query_runs_and_every_panel_has_data(stack: Stack) -> None:
    """A panel may be empty only where the running tier cannot provide any of its metrics
    (the age heatmap in the tracepoint tier); in the VM lab's kprobe tier none may be."""
    assert stack.running_tier == stack.planned_tier, "the daemon fell back to a lower tier"
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    empty = []
    for p in panels:
        with_data = 0
        for t in p["targets"]:
            query = with_vars(t["expr"])
            result = api(stack.prom, "query", query=query, time=stack.at)["result"]  # errors raise
            with_data += bool(result)
        if with_data:
            continue
        used = {m.name for m in PROBE_METRICS for t in p["targets"] if m.name in t["expr"]}
        if used and not used & stack.tier_metrics:
            print(f"panel {p['title']!r}: no data, its metrics {sorted(used)} are not in this tier")
            continue
        # What Prometheus holds of the panel's metrics right now, to tell "never scraped"
        # from "scraped, but the panel's window or selectors miss it".
        held = {m: len(api(stack.prom, "query", query=f"{{__name__=~\"{m}.*\"}}", time=stack.at)["result"])
                for m in used}
        empty.append(f"{p['title']} (series held: {held})")
    assert not empty, f"panels without data: {empty}"


def test_variables_have_values(stack: Stack) -> None:
    netns = api(stack.prom, "label/netns/values", **{"match[]": "tfowatch_kernel_tcpext_total"})
    assert str(stack.server.inode) in netns and str(stack.client.inode) in netns
    assert "e2e" in api(stack.prom, "label/comm/values", **{"match[]": "tfowatch_syn_data_sent_total"})
    assert api(stack.prom, "label/instance/values", **{"match[]": "tfowatch_build_info"})


def since_spike(stack: Stack) -> str:
    """A PromQL range from the spike's start to now."""
    return f"{max(1, int(time.time() - float(stack.spike_at)) + 1)}s"


def test_fallback_spike_alerts_are_pending_or_firing(stack: Stack) -> None:
    """Prometheus' own record of its alerts (the ALERTS series) since the spike: in a slow guest
    the spike's 5m window may have passed, and the alert ended, before this test runs."""
    want = {"TFOServerFallbackSpike": stack.server.inode, "TFOClientFallbackSpike": stack.client.inode}

    def both() -> dict[str, set[str]] | None:
        got: dict[str, set[str]] = {}
        for name, netns in want.items():
            query = f'ALERTS{{alertname="{name}",netns="{netns}"}}[{since_spike(stack)}]'
            got[name] = {r["metric"]["alertstate"] for r in api(stack.prom, "query", query=query)["result"]}
        return got if all(got.values()) else None

    got = wait_for(both, "both fallback-spike alerts")
    assert all(states <= {"pending", "firing"} for states in got.values()), got
    rules = {r["name"]: r for g in api(stack.prom, "rules")["groups"] for r in g["rules"]}
    for name in want:
        assert rules[name]["annotations"]["runbook_url"].endswith(f"{name}.md")
    # The ratio behind the server alert is the kernel's: 4 invalid cookies against 1 + 2 + 4
    # accepted children (a rate over the same window, so the ratio of the counts). Its peak
    # since the spike: at any one moment the rule may not have seen the spike yet (a fast
    # host rotates all 4 keys between two scrapes), or no longer (a slow guest).
    ratio = api(stack.prom, "query", query="max_over_time(tfowatch:server_tfo_fallback:ratio_rate5m"
                f'{{netns="{stack.server.inode}"}}[{since_spike(stack)}])')["result"]
    assert ratio and 0.05 < float(ratio[0]["value"][1]) < 1, ratio
