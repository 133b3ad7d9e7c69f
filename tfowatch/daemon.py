"""`tfowatch run`: the shared pipeline, served as Prometheus metrics."""

from __future__ import annotations

from tfowatch.config import Settings
from tfowatch.exporter import Scrape
from tfowatch.pipeline import Pipeline
from tfowatch.web import MetricsServer


class Daemon(Pipeline):
    """The pipeline plus an HTTP server that was bound (not yet serving) before BPF loaded."""

    def __init__(self, settings: Settings, server: MetricsServer) -> None:
        super().__init__(settings.mode, settings.series_cap, settings.perf_pages,
                         in_kernel_counts=True, strict=settings.strict)
        self.server = server

    def serve(self) -> None:
        self.server.start(Scrape(self.state))

    def close(self) -> None:
        # The server goes first: no scrape may read BPF maps that are being closed.
        self.server.close()
        super().close()
