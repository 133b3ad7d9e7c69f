"""Benchmark smoke test: `bench/run.py --quick` runs end to end (seconds, one repetition) and
its JSON holds every figure docs/PERFORMANCE.md reports; the report renders from it. The
numbers themselves are not judged here: they live in bench/results/ (`make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from netlab import skip_unless_root_bpf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
from run import CONDITIONS, WORKLOADS  # noqa: E402

PER_CONDITION = ["startup_s", "cpu_ms_per_1k", "bpf_ms_per_1k", "bpf_ms_per_1k_plain", "getppid_ns"] + \
    [f"{w}_{k}" for w in WORKLOADS for k in ("rate", "ratio")]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    skip_unless_root_bpf("benchmark smoke test", "bpftrace", "bpftool")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_every_condition_has_every_figure(result: dict[str, Any]) -> None:
    summary = result["overhead"]["summary"]
    assert set(summary) == set(CONDITIONS)
    for name in CONDITIONS:
        for key in PER_CONDITION:
            assert summary[name][key]["n"] == 1, (name, key)
        assert summary[name]["tfo_rate"]["median"] > 0, name
    for name in ("tfowatch", "tracepoint", "counters"):
        assert summary[name]["rss_bytes"]["median"] > 0
    # Programs of their own: tfowatch (both tiers) and bpftrace load some, counters-only and nothing none.
    rows = result["overhead"]["reps"][0]["rows"]
    assert rows["tfowatch"]["bpf_programs"] > 0 and rows["bpftrace"]["bpf_programs"] > 0
    assert rows["tracepoint"]["bpf_programs"] > 0
    assert rows["floor"]["bpf_programs"] == 2  # the empty sock_ops program and tracepoint
    assert rows["none"]["bpf_programs"] == rows["counters"]["bpf_programs"] == 0


def test_exactness_is_measured_against_the_kernel(result: dict[str, Any]) -> None:
    rows = result["overhead"]["reps"][0]["rows"]["tfowatch"]["exactness"]
    assert rows["syn_data_accepted_kernel"] > 0 and rows["events_emitted"] > 0
    ex = result["overhead"]["summary"]["tfowatch"]["exactness"]
    assert {"max_abs_drift", "events_lost", "events_per_s", "accepted_equal"} <= set(ex)


def test_scrape_latency_at_each_series_count(result: dict[str, Any]) -> None:
    points = result["scrape"]
    assert [p["target_series"] for p in points] == [200, 1000]
    for p in points:
        assert p["series"] >= p["target_series"]
        for times in (p["scrape_s"], p["gzip_scrape_s"], p["storm"]["scrape_s"]):
            assert 0 < times["p50"] <= times["p99"] <= times["max"]
        assert p["storm"]["storm_scrapes_per_s"] > 0  # the storm scraped beside the timed client
        inside = p["inside"]  # where a scrape's time goes, from the daemon's own self-metrics
        assert {"probes_s", "kernel_s", "self_s", "render_s", "http_s"} <= set(inside)
        assert inside["build_s"] > 0 and inside["client_s"] > 0


def test_bpf_time_is_split_per_program_and_rss_into_anonymous_and_file(result: dict[str, Any]) -> None:
    summary = result["overhead"]["summary"]
    for name in ("tfowatch", "tracepoint", "bpftrace", "floor"):
        for workload in WORKLOADS:
            progs = summary[name]["programs"][workload]
            assert progs and all(p["runs"]["n"] == 1 for p in progs.values()), (name, workload)
        # the per-program times add up to the condition's total
        total = sum(p["us"]["median"] for p in summary[name]["programs"]["plain"].values())
        assert total == pytest.approx(summary[name]["bpf_ms_per_1k_plain"]["median"])
    assert summary["none"]["programs"] == {"tfo": {}, "plain": {}}
    for name in ("tfowatch", "tracepoint", "counters"):
        anon, file = summary[name]["rss_anon_bytes"]["median"], summary[name]["rss_file_bytes"]["median"]
        assert anon > 0 and file > 0 and anon + file <= summary[name]["rss_bytes"]["median"] * 1.05


def test_aggregator_capacity(result: dict[str, Any]) -> None:
    agg = result["aggregator"]
    assert agg["decode_rate"] > 0
    for ladder in (agg["perf"], agg["perf_wakeup_per_event"]):
        assert ladder["steps"] and all(s["offered"] > 0 for s in ladder["steps"])
        assert "max_zero_loss_rate" in ladder and "first_loss_rate" in ladder


def test_report_renders_every_section(result: dict[str, Any]) -> None:
    text = "\n".join(report.section(result))
    for heading in ("| Target |", "| Beside the load |", "| Beside the load | program |", "| Series |",
                    "| Series | probes:", "| Offered events/s |", "the floor"):
        assert heading in text
    assert text.count("| yes |") + text.count("| **no** |") == 11  # a verdict for each target


def test_memory_is_sampled_over_a_run_at_saturation(result: dict[str, Any]) -> None:
    soak = result["soak"]
    assert soak["rate"] > 0 and len(soak["rss_anon"]) >= 10
    assert all(anon > 0 for _, anon in soak["rss_anon"])
    assert {"max_abs_drift", "events_lost"} <= set(soak["exactness"])


@pytest.mark.host_only
@pytest.mark.parametrize("workload", ["tfo", "plain"])
def test_the_c_load_generator_does_what_the_python_one_does(tmp_path: Path, workload: str) -> None:
    """bench/loadgen.c (`--load c`): its TFO connections are TFO by the server namespace's own
    TcpExt (at least as many accepted with SYN data), its plain ones are not, none fails."""
    skip_unless_root_bpf("C load generator")
    import run

    with run.workload("c", tmp_path) as wl:
        passive0 = wl.srv.tcpext()["TCPFastOpenPassive"]
        res = wl.run(workload, 1.0)
        accepted = wl.srv.tcpext()["TCPFastOpenPassive"] - passive0
    assert res["conns"] > 100 and res["errors"] == 0, res
    # the warm-up connection asks for the cookie; every one after carries data (those made
    # before the common start are not in `conns`)
    if workload == "tfo":
        assert accepted >= res["conns"], (accepted, res)
    else:
        assert accepted == 0, accepted


@pytest.mark.host_only
def test_each_sock_ops_callback_is_priced(tmp_path: Path) -> None:
    """bench/callbacks.py (where a connection's BPF time goes, per callback): the profiling
    build loads, the callbacks every TCP connection makes are each timed once per connection
    on the side it runs on, the TFO client asks for its state changes and a plain one does
    not, and the counts stay exact (drift 0) with the timing in."""
    skip_unless_root_bpf("sock_ops callback profile", "bpftool")
    from netlab import planned_plan

    if planned_plan()["tier"] != "sockops":
        pytest.skip("the callback profile runs the sockops tier: this kernel's auto tier is another "
                    "(the VM lab's kernels have kprobes)")
    out = tmp_path / "callbacks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "callbacks.py"), "--seconds", "1",
                           "--rate", "500", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["drift"] == {}
    res = res["workloads"]
    for workload in WORKLOADS:
        ops = res[workload]["ops"]
        for op in ("TCP_CONNECT_CB", "ACTIVE_ESTABLISHED_CB", "PASSIVE_ESTABLISHED_CB"):
            assert ops[op]["runs"] == pytest.approx(1.0, abs=0.05), (workload, op)
        timed_runs = sum(o["runs"] for o in ops.values())
        assert res[workload]["bpf_stats"]["runs"] == pytest.approx(timed_runs, rel=0.02)
    assert res["tfo"]["ops"]["STATE_CB"]["runs"] >= 1.9
    assert res["plain"]["ops"].get("STATE_CB", {"runs": 0.0})["runs"] < 0.05
