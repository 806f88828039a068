"""Counters of the bundle store for ``/metrics`` (Prometheus text format).

The counters live in the process (like the ingestion counters): each replica exposes its own, and Prometheus
sums them. :data:`METRICS` is the instance the API updates; :func:`bundle_metrics` renders it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from fleet_server.prometheus import metric_lines

__all__ = ["METRICS", "BundleMetrics", "bundle_metrics"]


class BundleMetrics:
    """Thread-safe counters: download requests by status, body bytes sent, bodies sent to the end, uploads by
    outcome and bytes received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.download_requests: Counter[int] = Counter()
        self.download_bytes = 0
        self.downloads_completed = 0
        self.uploads: Counter[str] = Counter()
        self.upload_bytes = 0

    def download_request(self, status: int) -> None:
        with self._lock:
            self.download_requests[status] += 1

    def download_sent(self, nbytes: int) -> None:
        with self._lock:
            self.download_bytes += nbytes

    def download_completed(self) -> None:
        with self._lock:
            self.downloads_completed += 1

    def upload(self, outcome: str, nbytes: int) -> None:
        """``outcome``: ``created``, ``existing`` or the failure reason (``signature``, ``too_large``...)."""
        with self._lock:
            self.uploads[outcome] += 1
            self.upload_bytes += nbytes

    def prometheus(self) -> str:
        """The counters in the Prometheus text exposition format."""
        with self._lock:
            requests = sorted(self.download_requests.items())
            uploads = sorted(self.uploads.items())
            sent, completed, received = self.download_bytes, self.downloads_completed, self.upload_bytes
        lines: list[str] = []

        def metric(name: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.extend(metric_lines(f"fleet_bundle_{name}", "counter", help_text, samples))

        metric("download_requests_total", "Bundle download requests (GET and HEAD), by HTTP status.",
               [(f'{{status="{s}"}}', n) for s, n in requests])
        metric("download_bytes_total", "Bundle bytes sent to devices.", [("", sent)])
        metric("downloads_completed_total", "Download responses whose body was sent to its end.", [("", completed)])
        metric("uploads_total", "Bundle uploads, by outcome (created, existing, or the refusal reason).",
               [(f'{{outcome="{o}"}}', n) for o, n in uploads])
        metric("upload_bytes_total", "Bundle upload bytes received.", [("", received)])
        return "\n".join(lines) + "\n"


METRICS = BundleMetrics()
"""The process's bundle counters (updated by ``fleet_server.api.bundles``)."""


def bundle_metrics(metrics: BundleMetrics | None = None) -> str:
    """The bundle store counters as Prometheus text (to append to ``/metrics``)."""
    return (metrics or METRICS).prometheus()
