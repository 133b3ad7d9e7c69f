"""Soak: one daemon under ten minutes of mixed TFO traffic while a SYN flood from random
addresses and ports (half with bogus TFO cookies) hits the same listener, and a client sprays
TFO connects at random ports to push the series cap. Throughout: every scrape answered, series
never above the cap; after warm-up, RSS (from /proc, not the daemon's word) grows < 5%; at the
end, the legitimate traffic's counts equal the kernel's and every reconciled series has drift 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netlab import (
    Lab,
    Samples,
    free_port,
    rss_bytes,
    scrape,
    series,
    skip_unless_root_bpf,
    start_daemon,
    unit_caps,
    value,
)

SOAK_S = float(os.environ.get("TFOWATCH_SOAK_S", "600"))
WARMUP_S = min(60.0, SOAK_S / 5)
SERIES_CAP = 100
PORT = 7801
FLOOD_PPS = "1000"
SPRAY_PER_S = "20"
LOAD = Path(__file__).parents[1] / "soakload.py"


def exposed_series(samples: Samples, family: str) -> int:
    return sum(1 for (name, _) in samples if name == family)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_S + 600)
def test_soak_under_syn_flood() -> None:
    skip_unless_root_bpf("soak test")
    lab = Lab()
    daemon = None
    try:
        srv, addr = lab.server("s", "3")
        client_addr = addr.rsplit(".", 1)[0] + ".1"
        subprocess.run(["ip", "-n", srv.name, "route", "add", "198.18.0.0/15", "via", client_addr],
                       check=True)
        lab.start_server(srv, str(PORT))
        listen = f"127.0.0.1:{free_port()}"
        daemon = start_daemon(listen, unit_caps("sys-admin.conf"), "--series-cap", str(SERIES_CAP))
        url = f"http://{listen}/metrics"
        before = {"c": lab.client.tcpext(), "s": srv.tcpext()}
        acked = 0
        for cmd in (("flood", addr, str(PORT), FLOOD_PPS), ("spray", addr, SPRAY_PER_S)):
            lab.procs.append(subprocess.Popen(["ip", "netns", "exec", lab.client.name, sys.executable,
                                               str(LOAD), *cmd], stdout=subprocess.DEVNULL, text=True))
        t0 = time.monotonic()
        rss_warm, rss_max, scrapes, worst_series = 0, 0, 0, 0
        while (elapsed := time.monotonic() - t0) < SOAK_S:
            rows = lab.client.peer("client", addr, str(PORT), "5", "--comm", "soak-tfo")
            acked += sum(1 for r in rows if r["acked"])
            samples = scrape(url)
            scrapes += 1
            for fam in ("tfowatch_syn_data_sent_total", "tfowatch_active_fallbacks_total"):
                worst_series = max(worst_series, exposed_series(samples, fam))
            assert all(v <= SERIES_CAP + 1 for v in series(samples, "tfowatch_series").values())
            rss = rss_bytes(daemon.pid)
            if elapsed < WARMUP_S:
                rss_warm = rss
            else:
                rss_max = max(rss_max, rss)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - elapsed)))
        for p in lab.procs[1:]:
            p.terminate()
        time.sleep(2)
        after = {"c": lab.client.tcpext(), "s": srv.tcpext()}
        samples = scrape(url)
        growth = (rss_max - rss_warm) / rss_warm
        passive_fail = after["s"]["TCPFastOpenPassiveFail"] - before["s"]["TCPFastOpenPassiveFail"]
        dropped = sum(series(samples, "tfowatch_series_dropped_total").values())
        print(f"soak {SOAK_S:.0f} s: {scrapes} scrapes, RSS {rss_warm / 2**20:.1f} MiB after warm-up, "
              f"max {rss_max / 2**20:.1f} MiB ({growth:+.2%}); worst family {worst_series} series "
              f"(cap {SERIES_CAP}), {dropped:.0f} events folded into 'other'; "
              f"legit TFO acked {acked}; PassiveFail +{passive_fail}, "
              f"lost {value(samples, 'tfowatch_events_lost_total'):.0f}")
        assert growth < 0.05
        assert worst_series <= SERIES_CAP + 1 and dropped > 0, "the spray never reached the cap"
        assert value(samples, "tfowatch_events_lost_total") == 0
        # The legitimate traffic: what the client saw acknowledged, the kernel counted, and tfowatch
        assert after["c"]["TCPFastOpenActive"] - before["c"]["TCPFastOpenActive"] == acked
        acked_series = sum(v for k, v in series(samples, "tfowatch_syn_data_acked_total").items()
                           if dict(k).get("comm") == "soak-tfo")
        assert acked_series == acked
        drift = series(samples, "tfowatch_reconcile_drift")
        mine = {str(lab.client.inode), str(srv.inode)}
        assert {dict(k)["netns"] for k in drift} & mine, "no reconciled series for the soak namespaces"
        assert all(v == 0 for k, v in drift.items() if dict(k)["netns"] in mine), drift
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        lab.close()
