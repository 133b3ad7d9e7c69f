"""`tfowatch run`: the shared pipeline, served as Prometheus metrics."""

from __future__ import annotations

import threading

from tfowatch.core.pipeline import Pipeline
from tfowatch.core.plan import Variant
from tfowatch.exporter.collector import Scrape
from tfowatch.exporter.config import Settings
from tfowatch.exporter.web import MetricsServer


class Daemon:
    """A pipeline (counting in the kernel) and an HTTP server that was bound, not yet
    serving, before BPF loaded."""

    def __init__(self, settings: Settings, server: MetricsServer) -> None:
        self.pipeline = Pipeline(settings.mode, settings.series_cap, settings.perf_pages,
                                 variant=Variant(in_kernel_counts=True), strict=settings.strict,
                                 netns_grace=settings.netns_grace, series_ttl=settings.series_ttl,
                                 netns_share=settings.netns_share)
        self.server = server

    def serve(self) -> None:
        self.server.start(Scrape(self.pipeline.state))

    def run(self, stop: threading.Event) -> None:
        self.pipeline.run(stop)

    def close(self) -> None:
        # The server goes first: no scrape may read BPF maps that are being closed.
        self.server.close()
        self.pipeline.close()
