"""Prometheus metrics of one ct1-cdc process, served by the API at ``/metrics``.

Counters and histograms are fed by the stage that runs in this process (capture counts
appended events, the dispatcher times attempts, the API counts requests); what every
process can read from the outbox (deliveries by endpoint and status, events by type,
the checkpoint's age) is collected from SQLite at scrape time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator

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


class OutboxCollector(Collector):
    """Reads the outbox at scrape time (a read-only connection of the API)."""

    def __init__(self, db: Callable[[], sqlite3.Connection], slot: str) -> None:
        self.db = db
        self.slot = slot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        conn = self.db()
        deliveries = GaugeMetricFamily(
            "ct1_cdc_deliveries",
            "Deliveries in the outbox by endpoint and status",
            labels=["endpoint", "status"],
        )
        for endpoint, status, n in conn.execute(
            "SELECT endpoint, status, count(*) FROM deliveries GROUP BY endpoint, status"
        ):
            deliveries.add_metric([endpoint, status], n)
        yield deliveries
        events = GaugeMetricFamily("ct1_cdc_outbox_events", "Events in the outbox by type", labels=["type"])
        for event_type, n in conn.execute("SELECT type, count(*) FROM events GROUP BY type"):
            events.add_metric([event_type], n)
        yield events
        last = GaugeMetricFamily("ct1_cdc_last_event_id", "Id of the newest event in the outbox")
        last.add_metric([], conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
        yield last
        problems = GaugeMetricFamily(
            "ct1_cdc_mapping_problems",
            "Mapping problems capture found in the live schema while running (e.g. a column a rule"
            " names was renamed); 0 when every rule fits",
        )
        try:
            count = conn.execute("SELECT count(*) FROM mapping_problems").fetchone()[0]
        except sqlite3.OperationalError:  # an outbox older than the table
            count = 0
        problems.add_metric([], count)
        yield problems
        row = conn.execute("SELECT updated_at FROM checkpoint WHERE slot = ?", (self.slot,)).fetchone()
        if row is not None:
            age = GaugeMetricFamily(
                "ct1_cdc_checkpoint_age_seconds", "Seconds since capture last committed a checkpoint"
            )
            age.add_metric([], max(0.0, time.time() - row[0]))
            yield age
