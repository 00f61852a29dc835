"""Prometheus metrics: definitions, the watcher observer, and the scrape-time collector.

Placeholder interface; the metrics issue fills it in. The API calls
``api_request`` after each request and ``render`` for ``GET /metrics``; the
watcher reports through the ``WatchObserver`` methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.daemon import Runtime

__all__ = ["Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    def bind(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # WatchObserver
    def event(self, action: str) -> None:
        pass

    def malformed(self) -> None:
        pass

    def inspected(self) -> None:
        pass

    def resynced(self, seconds: float) -> None:
        pass

    def propagated(self, seconds: float) -> None:
        pass

    # API
    def api_request(self, route: str, code: int, seconds: float) -> None:
        pass

    def render(self) -> tuple[bytes, str]:
        return b"", CONTENT_TYPE
