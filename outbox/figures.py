"""The outbox's figures for ``/metrics``, read at scrape time by any process: deliveries
by endpoint and status, events by type, the newest id, the mapping problems capture
stored, and when the slot's checkpoint was last committed."""

from __future__ import annotations

import sqlite3

from common.metrics import OutboxFigures
from outbox import source_state, store
from outbox.store import Q


def figures(conn: sqlite3.Connection, slot: str) -> OutboxFigures:
    checkpoint = store.checkpoint_of(conn, slot)
    return OutboxFigures(
        deliveries={
            (endpoint, status): n
            for endpoint, status, n in conn.execute(Q["stats_deliveries"], {"span": store.BATCH_SPAN})
        },
        events_by_type={event_type: n for event_type, n, _ in conn.execute(Q["stats_by_type"])},
        last_event_id=store.newest_event_id(conn),
        mapping_problems=source_state.problem_count(conn),
        checkpoint_updated_at=None if checkpoint is None else checkpoint[1],
    )
