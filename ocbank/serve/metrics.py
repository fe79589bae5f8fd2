"""Prometheus metrics of the ingress (prometheus_client text exposition at /metrics).

Requests and latency are counted where the HTTP request is answered; batch sizes
are measured by the model replicas and reported with each result, then counted
here once per model call (results carry their call's id).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SEEN_CALLS = 4096  # model-call ids remembered to count each call once
OTHER_PRODUCT = "_unknown"  # the label for requests to products that are not served (bounded cardinality)
# score / NG threshold: 1.0 is the threshold; fine steps around it, where false alarms and the update gate sit.
NORMALIZED_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """Counters and histograms in a registry of their own (one per ingress replica)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ocbank_requests", "Inspection requests by product and HTTP status", ["product", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ocbank_request_latency_seconds", "Inspection latency, body received to answer sent", ["product"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "ocbank_batch_size", "Images per model call (dynamic batching)", ["product"],
            buckets=tuple(float(b) for b in range(1, max_batch + 1)), registry=self.registry,
        )
        self.normalized_score = Histogram(
            "ocbank_normalized_score", "Inspected images' score / NG threshold (calibrated banks)", ["product"],
            buckets=NORMALIZED_BUCKETS, registry=self.registry,
        )
        self.calibration = Gauge(
            "ocbank_calibration_state", "1 for the bank's calibration health (ok, stale, drifting, uncalibrated; "
            "the reason is in /v1/banks), 0 for the other states", ["product", "state"], registry=self.registry,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()

    def request(self, product: str, status: int, seconds: float) -> None:
        self.requests.labels(product=product, status=str(status)).inc()
        self.latency.labels(product=product).observe(seconds)

    def model_call(self, product: str, call: dict[str, Any]) -> None:
        """Count one model call of ``call["size"]`` images, once whichever of its requests reports it."""
        if call["id"] in self._seen:
            return
        self._seen[call["id"]] = None
        if len(self._seen) > _SEEN_CALLS:
            self._seen.popitem(last=False)
        self.batch_size.labels(product=product).observe(call["size"])

    def normalized(self, product: str, value: float) -> None:
        self.normalized_score.labels(product=product).observe(value)

    def health(self, product: str, state: str, states: tuple[str, ...]) -> None:
        for name in states:
            self.calibration.labels(product=product, state=name).set(1.0 if name == state else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
