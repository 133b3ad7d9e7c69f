"""The Grafana dashboard and the Prometheus rules, checked without a running Prometheus:
generator output == committed JSON, dashboard structure, metric names against the exporter,
`promtool check rules`, `promtool test rules` (every alert fires and does not fire), and a
runbook page per alert. tests/host/test_prometheus_e2e.py runs them against real data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tfowatch.core.metrics import FAMILIES, PROCESS_PREFIX

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "monitoring" / "dashboards" / "tfowatch.json"
RULES = ROOT / "monitoring" / "rules" / "tfowatch.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "rules" / "tests" / "alerts.test.yml"
RUNBOOKS = ROOT / "monitoring" / "runbooks"


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not shutil.which("promtool"):
        pytest.fail("promtool missing: make setup installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_committed_dashboard_is_the_generator_output() -> None:
    build = ROOT / "monitoring" / "dashboards" / "build.py"
    out = subprocess.run([sys.executable, str(build)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == dashboard(), f"run: python {build} > {DASHBOARD}"


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("instance", "netns", "port", "comm"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']} overlaps another"
        cells |= mine
        if p["type"] == "row":  # a header: its panels follow it
            assert g["w"] == 24 and not p["panels"] and "targets" not in p
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])


def test_dashboard_covers_what_operators_ask_for() -> None:
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for want in ("server tfo success", "client tfo success", "cookies requested vs issued",
                 "fallbacks by reason", "blackhole", "time-wait reuse granted vs refused", "age",
                 "per listener port", "per process", "probe coverage", "degraded tier", "lost events",
                 "drift", "path: middleboxes", "active tfo disabled now", "per destination"):
        assert want in titles, want
    assert any(p["type"] == "heatmap" for p in dashboard()["panels"])


def test_every_metric_name_is_one_the_exporter_serves() -> None:
    """Catches a renamed metric: every tfowatch_* name in a query is a series of the contract."""
    served = {m.name for m in FAMILIES}
    served |= {f"{m.name}_{part}" for m in FAMILIES if m.kind == "histogram"
               for part in ("bucket", "count", "sum")}
    texts = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    texts += [v.get("definition", "") for v in dashboard()["templating"]["list"]]
    texts += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = {n for text in texts for n in re.findall(r"\btfowatch_[a-z_]+\b", text)}
    assert names
    for name in names:
        assert name in served or name.startswith(PROCESS_PREFIX), f"{name} is not in tfowatch/core/metrics.py"


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests_fire_and_do_not_fire() -> None:
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {a["alert"] for a in alerts()}, "every alert needs unit tests"
    # Each alert is tested both ways: firing (exp_alerts with entries) and quiet (exp_alerts: []).
    text = RULE_TESTS.read_text()
    for name in tested:
        end = r"(?=\n\s+- eval_time|\n\s+promql|\n  - |\Z)"
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*?){end}", text, re.S)
        assert any(c.strip() == "[]" for c in cases), name
        assert any(c.strip() != "[]" for c in cases), name


def test_every_alert_has_severity_annotations_and_a_runbook() -> None:
    for a in alerts():
        assert a["labels"]["severity"] in ("info", "warning", "critical"), a["alert"]
        ann = a["annotations"]
        assert ann["summary"] and ann["description"], a["alert"]
        url = ann["runbook_url"]
        assert url.endswith(f"/monitoring/runbooks/{a['alert']}.md"), url
        page = RUNBOOKS / f"{a['alert']}.md"
        assert page.exists(), page
        text = page.read_text()
        assert text.startswith(f"# {a['alert']}\n") and "**Confirm:**" in text and "**Act:**" in text


def test_the_degraded_runbook_and_readme_name_every_reason() -> None:
    """Each bounded `reason` of tfowatch_tier_degraded has its row in the runbook and its name
    in the README."""
    from tfowatch.bpf.loader import DEGRADED_FIX
    runbook = (RUNBOOKS / "TfowatchTierDegraded.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for reason in DEGRADED_FIX:
        assert f"| `{reason}` |" in runbook, reason
        assert f"`{reason}`" in readme, reason
