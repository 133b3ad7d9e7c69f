"""`run` counts events per label set in a BPF map; an event that finds the map full goes out
as a perf sample instead. Both paths together must stay exact: here the map holds a single
label set, so most traffic takes the fallback, and the counts must still equal what the
server accepted per port and the kernel's TcpExt."""

from __future__ import annotations

import pytest
from netlab import Lab, skip_unless_root_bpf

from tfowatch.bpf import loader as bpfprog
from tfowatch.core.metrics import SYN_DATA_ACCEPTED, SYN_DATA_SENT
from tfowatch.core.pipeline import Pipeline
from tfowatch.core.plan import Variant

PORTS = {"7801": 3, "7802": 2}


def test_full_map_falls_back_to_samples_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_root_bpf("in-kernel counts")
    monkeypatch.setattr(bpfprog, "MAX_COUNTS", 1)
    lab = Lab()
    pipe = None
    try:
        srv, addr = lab.server("s", "3")
        log = lab.start_server(srv, *PORTS)
        pipe = Pipeline(variant=Variant(in_kernel_counts=True))
        assert pipe.probes is not None and pipe.probes.variant.in_kernel_counts
        for port, n in PORTS.items():
            lab.client.peer("client", addr, port, str(n + 1), "--comm", f"ikc{port}")
        accepted = lab.accepted(log)
        st = pipe.state()
        in_map = pipe.probes.counts()
        assert len(in_map) == 1, "the map holds one label set; the rest must be samples"
        assert st.snap.lost == 0
        server = st.snap.counters[SYN_DATA_ACCEPTED]
        for port in PORTS:
            want = sum(1 for row in accepted if row["port"] == int(port) and row["tfo_child"])
            got = sum(v for k, v in server.items() if k[0] == str(srv.inode) and k[1] == port)
            assert got == want > 0, port
        sent = st.snap.counters[SYN_DATA_SENT]
        for port, n in PORTS.items():
            got = sum(v for k, v in sent.items() if k[1] == port)
            assert got == (n if port == "7801" else n + 1), port  # 7801 fetched the cookie
        assert st.drift and all(v == 0 for v in st.drift.values()), st.drift
    finally:
        if pipe is not None:
            pipe.close()
        lab.close()
