"""Prometheus metrics of one ct1-cdc process, served by the API at ``/metrics``.

Counters and histograms are fed by the stage that runs in this process (capture counts
appended events, the dispatcher times attempts, the API counts requests); what every
process can read from the outbox (deliveries by endpoint and status, events by type,
the checkpoint's age) is read at scrape time: :class:`OutboxCollector` turns the figures
the outbox gives (``outbox.figures``) into gauges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_APPENDED = Counter(
    "ct1_cdc_events_appended", "Events appended to the outbox by this process", ["type"], registry=REGISTRY
)
CAPTURE_LAG = Gauge(
    "ct1_cdc_capture_lag_bytes",
    "WAL bytes between the server's position and the slot's confirmed one",
    registry=REGISTRY,
)
SLOT_LOST = Gauge(
    "ct1_cdc_slot_lost",
    "1 when Postgres has invalidated the replication slot (wal_status lost): capture cannot go on",
    registry=REGISTRY,
)
ATTEMPT_SECONDS = Histogram(
    "ct1_cdc_delivery_attempt_seconds",
    "Duration of webhook delivery attempts",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "ct1_cdc_delivery_attempts",
    "Webhook delivery attempts by outcome",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "ct1_cdc_api_requests", "HTTP API requests by route and status", ["route", "status"], registry=REGISTRY
)


@dataclass(frozen=True, slots=True)
class OutboxFigures:
    """What any process can read from the outbox at scrape time (``outbox.figures``)."""

    deliveries: dict[tuple[str, str], int]  # (endpoint, status) -> deliveries
    events_by_type: dict[str, int]
    last_event_id: int
    mapping_problems: int
    checkpoint_updated_at: float | None  # when capture last committed a checkpoint of the slot


class OutboxCollector(Collector):
    """Gauges of the outbox, from figures ``read`` at scrape time."""

    def __init__(self, read: Callable[[], OutboxFigures], clock: Callable[[], float] = time.time) -> None:
        self.read = read
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self.read()
        deliveries = GaugeMetricFamily(
            "ct1_cdc_deliveries",
            "Deliveries in the outbox by endpoint and status",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), n in figures.deliveries.items():
            deliveries.add_metric([endpoint, status], n)
        yield deliveries
        events = GaugeMetricFamily("ct1_cdc_outbox_events", "Events in the outbox by type", labels=["type"])
        for event_type, n in figures.events_by_type.items():
            events.add_metric([event_type], n)
        yield events
        last = GaugeMetricFamily("ct1_cdc_last_event_id", "Id of the newest event in the outbox")
        last.add_metric([], figures.last_event_id)
        yield last
        problems = GaugeMetricFamily(
            "ct1_cdc_mapping_problems",
            "Mapping problems capture found in the live schema while running (e.g. a column a rule"
            " names was renamed); 0 when every rule fits",
        )
        problems.add_metric([], figures.mapping_problems)
        yield problems
        if figures.checkpoint_updated_at is not None:
            age = GaugeMetricFamily(
                "ct1_cdc_checkpoint_age_seconds", "Seconds since capture last committed a checkpoint"
            )
            age.add_metric([], max(0.0, self.clock() - figures.checkpoint_updated_at))
            yield age
