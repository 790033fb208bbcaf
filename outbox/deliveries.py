"""Deliveries: the dispatcher's claims and attempt log, and what an operator lists and
replays (``ct1-cdc outbox deliveries|show|replay``).

:class:`DeliveryStore` is the dispatcher's adapter.  All its methods are synchronous:
the dispatcher calls the reads (``changed``, ``claim``, ``next_due``) on one thread and
everything else on another (see :class:`dispatcher.worker.Dispatcher`), so claims never
wait behind a commit's fsync and one thread owns the dispatcher's writes; capture's
writer uses another connection and SQLite serialises the two writers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from common import sqlfile
from outbox import endpoints, store
from outbox.endpoints import EndpointState

D = sqlfile.load("outbox", "deliveries.sql")
MATERIALIZE_BATCH = 5000  # events past a cursor made rows of in one commit


@dataclass(frozen=True, slots=True)
class Due:
    event_id: int
    attempts: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """One attempt and where it leaves the delivery (fields in the order of the
    ``record_attempts`` batch)."""

    endpoint: str
    event_id: int
    attempted_at: float
    http_status: int
    duration_ms: float
    error: str | None
    response: str | None
    status: str  # pending | delivered | dead
    next_attempt_at: float


class DeliveryStore:
    def __init__(self, path: str | Path) -> None:
        self.conn = store.open_outbox(path)  # writes: attempts, delivery and endpoint state
        self.conn.execute("PRAGMA busy_timeout=60000")  # capture may hold the lock a while
        # Claims read on a connection of their own, so they never queue behind an fsync.
        self.reader = store.connect(path)
        self._data_version = -1

    def changed(self) -> bool:
        """Whether another connection committed since the last call (cheap to poll)."""
        version = store.data_version(self.reader)
        changed = version != self._data_version
        self._data_version = version
        return changed

    def claim(self, endpoint: str, now: float, limit: int, skip: Collection[int]) -> list[Due]:
        """Up to ``limit`` due deliveries, oldest first, none of the ``skip`` event ids."""
        row = self.reader.execute(
            D["claim"], {"endpoint": endpoint, "now": now, "limit": limit, "skip": store.dumps(list(skip))}
        ).fetchone()
        due = []
        for event_id, attempts, *envelope in orjson.loads(row[0]):
            body = store.envelope_json((event_id, *envelope)).encode("utf-8")
            due.append(Due(event_id, attempts, body))
        due.sort(key=lambda d: d.event_id)
        return due

    def materialize(self, endpoint: str, batch: int = MATERIALIZE_BATCH) -> int:
        """Make the delivery rows of the events past ``endpoint``'s cursor that its routes
        take (at most ``batch`` events further), and move the cursor, in one commit; the
        events appended since the last call become claimable. Returns how far it went."""
        row = self.conn.execute(D["cursor_of"], (endpoint,)).fetchone()
        last = int(self.conn.execute(store.Q["last_event_id"]).fetchone()[0])
        if row is None or int(row[0]) >= last:
            return 0  # the common case when idle: two reads, no write
        # Without an fsync of its own: rows and cursor can be made again from the events,
        # and the next durable commit on this file (an attempt record, capture's next
        # group) makes them durable too, since the WAL is written in order.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with store.transaction(self.conn):
                after = int(self.conn.execute(D["cursor_of"], (endpoint,)).fetchone()[0])
                upto = min(int(self.conn.execute(store.Q["last_event_id"]).fetchone()[0]), after + batch)
                args = {"endpoint": endpoint, "after": after, "upto": upto}
                self.conn.execute(D["materialize"], args)
                self.conn.execute(D["move_cursor"], args)
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")
        return upto - after

    def next_due(self, endpoint: str) -> float | None:
        row = self.reader.execute(D["next_due"], (endpoint,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def finish_many(self, results: list[Finished]) -> None:
        """Record attempts and the deliveries' new states in one transaction (group
        commit: one fsync for every delivery that finished meanwhile).  The batch goes to
        SQLite as one JSON document per statement, so this thread asks for the GIL a
        handful of times per commit rather than twice per delivery."""
        batch = store.dumps(
            [
                (
                    r.endpoint,
                    r.event_id,
                    r.attempted_at,
                    r.http_status,
                    r.duration_ms,
                    r.error,
                    r.response,
                    r.status,
                    r.next_attempt_at,
                )
                for r in results
            ]
        )
        with store.transaction(self.conn):
            self.conn.execute(D["record_attempts"], {"batch": batch})
            self.conn.execute(D["finish_deliveries"], {"batch": batch})

    def endpoint(self, name: str) -> EndpointState:
        return endpoints.state_of(self.conn, name)

    def save_endpoint(self, state: EndpointState) -> None:
        endpoints.save_state(self.conn, state)

    def close(self) -> None:
        self.reader.close()
        self.conn.close()


# -- what an operator sees and does ---------------------------------------------------------


def list_deliveries(
    conn: sqlite3.Connection,
    *,
    status: str | None = None,
    endpoint: str | None = None,
    event_id: int | None = None,
    after: int = 0,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Deliveries by event id then endpoint, with their state, last HTTP status and error."""
    params = {"status": status, "endpoint": endpoint, "event_id": event_id, "after": after, "limit": limit}
    keys = (
        "endpoint",
        "event_id",
        "type",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status",
        "last_error",
    )
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(D["list_deliveries"], params)]


def attempts_of(conn: sqlite3.Connection, event_id: int) -> list[dict[str, Any]]:
    """Every recorded attempt to deliver one event, oldest first."""
    keys = ("endpoint", "attempted_at", "status", "duration_ms", "error", "response")
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(D["delivery_attempts"], (event_id,))]


def replay_event(conn: sqlite3.Connection, event_id: int, *, endpoint: str | None, now: float) -> int:
    """Make an event's deliveries (to ``endpoint``, or every one) due again at ``now`` with
    a fresh retry schedule; how many."""
    args = {"event_id": event_id, "endpoint": endpoint, "now": now}
    with store.transaction(conn):
        conn.execute(D["make_event_rows"], args)
        cur = conn.execute(D["replay_event"], args)
    return cur.rowcount


def replay_dead(conn: sqlite3.Connection, *, endpoint: str | None, since: float, now: float) -> int:
    """Make every dead delivery of events stored since ``since`` due again; how many."""
    with store.transaction(conn):
        cur = conn.execute(D["replay_dead"], {"endpoint": endpoint, "since": since, "now": now})
    return cur.rowcount
