"""Every Prometheus metric of the service, in one registry per service instance.

A dedicated :class:`CollectorRegistry` per :class:`ServiceMetrics` (not the global one), so
tests can run many servers in one process. :meth:`ServiceMetrics.track` is the one latency
helper both transports use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from esans_service.errors import status_name

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass
class CallOutcome:
    """How a tracked call is labelled; the transport may refine both while it runs."""

    method: str
    status: str = "OK"


class ServiceMetrics:
    """The service's metrics (names prefixed ``esans_``) in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "esans_requests",
            "Requests by transport, method and status (gRPC code name or HTTP status)",
            ["transport", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "esans_request_latency_seconds",
            "Request latency by transport and method",
            ["transport", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "esans_in_flight_requests", "Requests being handled now", ["transport"], registry=r
        )
        self.rejected = Counter(
            "esans_rejected_requests",
            "Sampling requests refused because max_concurrency were already running",
            registry=r,
        )
        self.unauthenticated = Counter(
            "esans_unauthenticated_requests",
            "Sampling or codebook-info calls refused for a missing or unknown token",
            ["transport"],
            registry=r,
        )
        self.trainer_calls = Counter(
            "esans_trainer_requests",
            "Authenticated sampling and codebook-info calls, by the token's trainer name",
            ["trainer", "transport"],
            registry=r,
        )
        self.credential_reloads = Counter(
            "esans_credential_reloads",
            "Certificate or token files taken anew after a change, by kind (tls, tokens)",
            ["kind"],
            registry=r,
        )
        self.worker_up = Gauge(
            "esans_worker_up",
            "1 for each worker process serving (esans serve --workers); 0 once it stopped",
            ["worker"],
            registry=r,
        )
        self.catalogue_drift = Gauge(
            "esans_catalogue_drift",
            "Drift of the active codebook's catalogue since its build (esans assign): "
            "added_share, error_ratio (the worst new items' median quantisation error over the "
            "build's, of any delta since the build), "
            "max_cluster_growth, rebuild_recommended (1 = rebuild with esans build)",
            ["measure"],
            registry=r,
        )
        self.negatives = Counter(
            "esans_negatives_served",
            "Negatives returned, by sampler and kind (simple, hard, virtual_simple, virtual_hard)",
            ["sampler", "kind"],
            registry=r,
        )
        self.hard_slots = Counter(
            "esans_hard_slots_requested",
            "Hard-negative slots asked for (B * m_h), by sampler; the fill is "
            "esans_negatives_served_total{kind=hard} over this",
            ["sampler"],
            registry=r,
        )
        self.active_codebook = Info(
            "esans_active_codebook", "The codebook version served by default", registry=r
        )
        self.swaps = Counter(
            "esans_codebook_swaps", "Times a new active codebook was swapped in", registry=r
        )
        self.redis_errors = Counter(
            "esans_redis_errors",
            "Codebook store failures seen by the registry (unreachable, unloadable version)",
            registry=r,
        )
        self.stale = Gauge(
            "esans_codebook_stale",
            "1 while the store is unreachable and the last good codebook is served",
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the hot path labels a handful of children
        per call, and prometheus_client's lookup (a lock and a tuple per call) adds up. For
        metrics with a small, fixed set of label values only; nothing here is ever removed."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    @contextmanager
    def track(self, transport: str, method: str) -> Iterator[CallOutcome]:
        """Count and time one call; an escaping exception sets its gRPC code as status."""
        outcome = CallOutcome(method)
        in_flight = self.child(self.in_flight, transport)
        in_flight.inc()
        start = time.perf_counter()
        try:
            yield outcome
        except BaseException as exc:
            outcome.status = status_name(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.child(self.latency, transport, outcome.method).observe(elapsed)
            self.child(self.requests, transport, outcome.method, outcome.status).inc()
            in_flight.dec()

    def in_flight_total(self) -> int:
        """Requests being handled now, over both transports."""
        return int(sum(s.value for metric in self.in_flight.collect() for s in metric.samples))

    def codebook_swapped(self, version: str) -> None:
        """Registry ``on_swap`` callback."""
        self.swaps.inc()
        self.active_codebook.info({"version": version})

    def catalogue_changed(self, metadata: Mapping[str, Any]) -> None:
        """Export the drift of the active codebook (0 for a fresh build)."""
        drift = metadata.get("delta") or {}
        growth = (drift.get("largest_cluster_growth") or {}).get("growth", 0.0)
        values = {
            "added_share": drift.get("added_share_since_build", 0.0),
            "error_ratio": drift.get("error_ratio_since_build") or 0.0,
            "max_cluster_growth": growth,
            "rebuild_recommended": 1.0 if drift.get("rebuild") else 0.0,
        }
        for measure, value in values.items():
            self.catalogue_drift.labels(measure=measure).set(float(value))

    def store_error(self, exc: Exception) -> None:
        """Registry ``on_store_error`` callback."""
        self.redis_errors.inc()

    def watch_stale(self, is_stale: Callable[[], bool]) -> None:
        """Read the stale gauge from ``is_stale`` at every scrape."""
        self.stale.set_function(lambda: 1.0 if is_stale() else 0.0)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
