"""Retention (``ct1-cdc outbox prune``): settled events older than a cutoff go, with
their deliveries and attempts (a first-try success leaves its batch in
``attempt_batches``).  An event with a pending delivery is never pruned, and
event ids are never reused (AUTOINCREMENT remembers the highest one).

Pruning takes batches of :data:`BATCH` events, each in its own transaction, so capture
and the dispatcher keep writing meanwhile; every statement finds its rows through an
index, so the work is proportional to what goes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from common import sqlfile
from outbox import store

R = sqlfile.load("outbox", "retention.sql")
BATCH = 5000


def prunable(conn: sqlite3.Connection, cutoff: float) -> int:
    """How many events :func:`prune` would remove now."""
    return int(conn.execute(R["prune_count"], {"cutoff": cutoff}).fetchone()[0])


def prune(
    conn: sqlite3.Connection,
    cutoff: float,
    *,
    batch: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Remove settled events stored before ``cutoff`` (unix time) with their deliveries
    and attempts; how many events went.  ``progress`` gets the running total after each
    batch."""
    # Deliveries go before their events in the same transaction; checking the foreign key
    # on each deleted event would scan every delivery (no index leads with event_id).
    conn.execute("PRAGMA foreign_keys=OFF")
    removed = 0
    try:
        while True:
            ids = [r[0] for r in conn.execute(R["prune_candidates"], {"cutoff": cutoff, "batch": batch})]
            if not ids:
                return removed
            payload = store.dumps(ids)
            span = {"ids": payload, "first": ids[0], "last": ids[-1], "span": store.BATCH_SPAN}
            with store.transaction(conn):
                for name in ("prune_attempts", "prune_deliveries"):
                    conn.execute(R[name], {"ids": payload})
                for name in ("prune_batch_events", "prune_batch_counts", "prune_empty_batches"):
                    conn.execute(R[name], span)
                conn.execute(R["prune_events"], {"ids": payload})
            removed += len(ids)
            if progress is not None:
                progress(removed)
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
