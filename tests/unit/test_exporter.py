"""Exposition: names and labels of the contract, absent-not-zero, promtool-clean."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import export_state, facts

from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import Event, EventType, RefuseReason
from tfowatch.core.pipeline import Pipeline
from tfowatch.core.plan import Plan, resolve
from tfowatch.core.state import KERNEL, PROBES, SELF
from tfowatch.exporter.collector import Scrape, TfoCollector


def exposition(plan: Plan, agg: Aggregator, kernel: dict[int, dict[str, int]]) -> str:
    state = export_state(plan, agg, kernel)
    reg = CollectorRegistry()
    reg.register(TfoCollector(lambda: state))
    return generate_latest(reg).decode()


def busy_aggregator() -> Aggregator:
    agg = Aggregator()
    for t in EventType:
        agg.add(Event(t, netns=7, port=7001, comm="client", reason=RefuseReason.TOO_RECENT, age_ms=250))
    return agg


def test_kprobe_tier_exposes_every_contract_metric() -> None:
    text = exposition(resolve(facts("6.1."), "auto"), busy_aggregator(),
                      {7: {"TCPFastOpenPassive": 1, "TWRecycled": 1}})
    for name in ["tfowatch_cookie_requests_total", "tfowatch_cookies_issued_total",
                 "tfowatch_syn_data_accepted_total", "tfowatch_passive_fallbacks_total",
                 "tfowatch_syn_data_sent_total", "tfowatch_syn_data_acked_total",
                 "tfowatch_active_fallbacks_total", "tfowatch_blackhole_disables_total",
                 "tfowatch_tw_reuse_total", "tfowatch_tw_reuse_age_seconds",
                 "tfowatch_kernel_tcpext_total", "tfowatch_reconcile_drift",
                 "tfowatch_probe_attached", "tfowatch_events_total", "tfowatch_events_lost_total",
                 "tfowatch_build_info", "tfowatch_series_dropped_total"]:
        assert f"# HELP {name}" in text, name
    assert 'tfowatch_passive_fallbacks_total{netns="7",port="7001",reason="server_disabled"} 1.0' in text
    assert 'tfowatch_tw_reuse_total{cgroup="",comm="client",netns="7",port="7001",' \
           'reason="too_recent",result="refused"} 1.0' in text
    assert 'tfowatch_reconcile_drift{metric="syn_data_accepted",netns="7"} 0.0' in text
    assert 'tfowatch_reconcile_drift{metric="cookie_requests",netns="7"} 1.0' in text


def test_tracepoint_tier_leaves_what_it_cannot_see_absent() -> None:
    text = exposition(resolve(facts("6.18."), "tracepoint"), busy_aggregator(), {})
    for name in ["tfowatch_cookie_requests_total", "tfowatch_cookies_issued_total",
                 "tfowatch_passive_fallbacks_total", "tfowatch_tw_reuse_total",
                 "tfowatch_tw_reuse_age_seconds", "tfowatch_blackhole_disables_total"]:
        assert name not in text, name
    assert "\ntfowatch_syn_data_accepted_total{" in text


@pytest.mark.parametrize("release", ["6.1.", "6.18."])
def test_promtool_check_metrics(release: str) -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool missing: make setup installs Debian's prometheus package")
    text = exposition(resolve(facts(release), "auto"), busy_aggregator(), {7: {"TWRecycled": 3}})
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scrape_writes_what_prometheus_client_writes() -> None:
    """/metrics renders the probe counters itself (ProbeText): line for line what
    prometheus_client writes for the same state, odd label values included."""
    agg = busy_aggregator()
    for comm in ['quo"te', "back\\slash", "new\nline", "ünï"]:
        agg.add(Event(EventType.SYN_DATA_SENT, netns=8, port=443, comm=comm, cgroup="/a b"))
    state = export_state(resolve(facts("6.1."), "auto"), agg, {7: {"TCPFastOpenPassive": 1}})
    slow = exposition(resolve(facts("6.1."), "auto"), agg, {7: {"TCPFastOpenPassive": 1}})
    scrape = Scrape(lambda: state)
    for _ in range(2):  # the second time from the kept label prefixes
        fast = scrape.render().decode()
        own = [line for line in fast.splitlines() if "tfowatch_process_" not in line]
        assert sorted(own) == sorted(slow.splitlines())


def test_a_failed_part_costs_its_own_series_not_the_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel part fails (its counters cannot be read this time): the answer still comes,
    without the kernel families and drift, and says which part failed, as node_exporter does."""
    pipe = Pipeline(mode="counters")
    try:
        def unreadable() -> dict[int, dict[str, int]]:
            raise OSError("no such namespace")

        monkeypatch.setattr(pipe.counters, "read", unreadable)
        fams = {f.name: f for f in text_string_to_metric_families(Scrape(pipe.state).render().decode())}
    finally:
        pipe.close()
    success = {s.labels["collector"]: s.value for s in fams["tfowatch_scrape_collector_success"].samples}
    assert success == {PROBES: 1, KERNEL: 0, SELF: 1}
    assert "tfowatch_kernel_tcpext" not in fams and "tfowatch_netns_unreadable" not in fams
    assert "tfowatch_build_info" in fams and "tfowatch_probe_attached" in fams
    durations = fams["tfowatch_scrape_collector_duration_seconds"].samples
    assert {s.labels["collector"] for s in durations} == {PROBES, KERNEL, SELF}


def _outcomes(acked: int, not_acked: int) -> Aggregator:
    agg = Aggregator()
    for t, n in ((EventType.SYN_DATA_SENT, acked + not_acked + 2), (EventType.SYN_DATA_ACKED, acked),
                 (EventType.DATA_NOT_ACKED, not_acked)):
        for _ in range(n):
            agg.add(Event(t, netns=7, port=53, comm="unbound"))
    return agg


@pytest.mark.parametrize(("acked", "not_acked", "pending", "want"), [
    (3, 1, 0, {"syn_data_acked": -1, "active_fail": -1}),  # two short, none open: drift
    (3, 1, 2, {"syn_data_acked": 0, "active_fail": 0}),  # both short ones are still open
    (4, 1, 1, {"syn_data_acked": 0, "active_fail": 0}),  # the open one will be not-acked
    (3, 1, 1, {"syn_data_acked": -1, "active_fail": -1}),  # one open cannot explain two
    (5, 2, 1, {"syn_data_acked": 1, "active_fail": 0}),  # an excess is never excused
])
def test_drift_allows_for_open_connections_whose_outcome_is_counted_at_close(
        acked: int, not_acked: int, pending: int, want: dict[str, int]) -> None:
    """The kernel counted 4 acked and 2 not acked at their SYN-ACKs; the tracepoint tier counts
    each at its connection's end, so the open ones are short until then."""
    from tfowatch.core.reconcile import drift

    plan = resolve(facts("6.18."), "tracepoint")
    assert plan.outcomes_at_close
    kernel = {7: {"TCPFastOpenActive": 4, "TCPFastOpenActiveFail": 2, "TCPFastOpenPassive": 0}}
    got = drift(_outcomes(acked, not_acked).snapshot(), kernel, plan.reconciled, {7: pending})
    assert {label: v for (_, label), v in got.items() if label in want} == want


def test_pending_outcomes_are_exported_only_where_outcomes_wait_for_the_close() -> None:
    for mode, served in (("tracepoint", True), ("sockops", False)):
        plan = resolve(facts("6.18."), mode)
        state = export_state(plan, _outcomes(3, 1), {7: {"TCPFastOpenActive": 4}})
        state.pending = {7: 1, 8: 0}
        reg = CollectorRegistry()
        reg.register(TfoCollector(lambda state=state: state))  # type: ignore[misc]
        text = generate_latest(reg).decode()
        assert ('tfowatch_syn_data_pending{netns="7"} 1.0' in text) is served, mode
        assert 'tfowatch_syn_data_pending{netns="8"}' not in text
