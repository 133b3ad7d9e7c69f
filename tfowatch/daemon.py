"""`tfowatch run`: the shared pipeline, served as Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfowatch.exporter import TfoCollector, serve
from tfowatch.pipeline import Pipeline


@dataclass
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 19135
    mode: str = "auto"
    series_cap: int = 1000
    perf_pages: int = 256


class Daemon(Pipeline):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.mode, settings.series_cap, settings.perf_pages)
        self.settings = settings
        self._server: Any = None

    def serve(self) -> None:
        collector = TfoCollector(self.state)
        self._server = serve(collector, self.settings.listen_host, self.settings.listen_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        super().close()
