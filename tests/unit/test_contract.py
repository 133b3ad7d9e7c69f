"""The metric contract (tfowatch/core/metrics.py) against what is served and what is documented.

No root: plans from the recorded kernel facts (tests/facts/), the exposition of a fixed state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.parser import text_string_to_metric_families
from support import export_state, facts

from tfowatch.core import metrics as m
from tfowatch.core.aggregator import Aggregator
from tfowatch.core.events import EVENTS, RECONCILIATIONS, Event, EventType
from tfowatch.core.plan import resolve
from tfowatch.exporter.collector import Scrape

ROOT = Path(__file__).parents[2]
RELEASES = ("6.1.", "6.12.", "6.18.")


def metrics_table() -> Any:
    spec = importlib.util.spec_from_file_location("metrics_table", ROOT / "scripts" / "metrics_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scrape(release: str, agg: Aggregator, kernel: dict[int, dict[str, int]]) -> dict[str, Family]:
    plan = resolve(facts(release), "auto")
    text = Scrape(lambda: export_state(plan, agg, kernel)).render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_readme_table_is_the_contract() -> None:
    mt = metrics_table()
    readme = (ROOT / "README.md").read_text()
    assert mt.section(readme) == mt.table(), "README's metric table differs: run scripts/metrics_table.py"
    assert readme.count(mt.table()) == 1


def test_names_kinds_and_event_table_agree() -> None:
    names = [f.name for f in m.FAMILIES]
    assert len(names) == len(set(names))
    for f in m.FAMILIES:
        assert f.name.startswith("tfowatch_") and (f.kind == "counter") == f.name.endswith("_total"), f.name
        assert (f.kind == "histogram") == bool(f.buckets), f.name
    fed = {f for s in EVENTS for f in s.metrics}
    assert fed == set(m.PROBE_METRICS)  # every probe family is fed by an event, and only those are
    assert {s.type for s in EVENTS} == set(EventType)  # one row per C enum value


@pytest.mark.parametrize("release", RELEASES)
def test_each_tier_serves_the_probe_families_the_contract_gives_it(release: str) -> None:
    plan = resolve(facts(release), "auto")
    assert set(plan.metrics) == {f for f in m.PROBE_METRICS if plan.tier in f.tiers}, plan.tier


@pytest.mark.parametrize("release", RELEASES)
def test_exposition_is_the_contract(release: str) -> None:
    """Every family served is in the contract, with its type, help and labels; every family the
    contract gives this tier (but the HTTP server's, served beside) is served."""
    agg = Aggregator()
    for t in EventType:
        agg.add(Event(t, netns=7, port=7001, pid=3, comm="c", reason=1, age_ms=20))
    served = scrape(release, agg, {7: {"TCPFastOpenPassive": 1}})
    tier = resolve(facts(release), "auto").tier
    contract = {f.family: f for f in m.FAMILIES}
    for name, fam in served.items():
        if name.startswith(m.PROCESS_PREFIX):
            continue
        f = contract[name]
        assert (fam.type, fam.documentation) == (f.kind, f.help), name
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == set(f.labels), (name, sample.labels)
    want = {f.family for f in m.FAMILIES if tier in f.tiers and f.source != m.HTTP}
    assert want <= set(served), want - set(served)


def test_series_dropped_has_a_zero_per_served_family_until_a_drop() -> None:
    served = scrape("6.1.", Aggregator(), {})
    dropped = {s.labels["metric"]: s.value for s in served["tfowatch_series_dropped"].samples}
    assert dropped == {f.name: 0 for f in m.PROBE_METRICS}


def test_events_are_the_types_the_programs_can_report_and_lost_has_no_labels() -> None:
    """`run` never builds plain connects (doctor's): no plain_connect series that stays 0."""
    for release in RELEASES:
        plan = resolve(facts(release), "auto")
        served = scrape(release, Aggregator(), {})
        types = {s.labels["type"] for s in served["tfowatch_events"].samples}
        assert types == {t.name.lower() for t in plan.events} and "plain_connect" not in types
        [lost] = served["tfowatch_events_lost"].samples
        assert lost.labels == {}


def test_drift_has_every_reconciled_metric_of_an_active_namespace_and_none_of_an_idle_one() -> None:
    agg = Aggregator()
    agg.add(Event(EventType.SYN_DATA_ACCEPTED, netns=7, port=80))
    served = scrape("6.1.", agg, {7: {}, 8: {}, 9: {"TCPFastOpenActive": 2}})
    drift = {(s.labels["netns"], s.labels["metric"]): s.value
             for s in served["tfowatch_reconcile_drift"].samples}
    labels = {r.label for r in RECONCILIATIONS}
    assert {label for ns, label in drift if ns == "7"} == labels
    assert {label for ns, label in drift if ns == "9"} == labels
    assert not any(ns == "8" for ns, _ in drift)
    assert drift[("7", "syn_data_accepted")] == 1 and drift[("9", "syn_data_acked")] == -2
    assert drift[("7", "cookie_requests")] == 0
