"""The dispatcher's SQLite adapter: claim due deliveries, record attempts, endpoint health.

All methods are synchronous.  The dispatcher calls the reads (``changed``, ``claim``,
``next_due``) on one thread and everything else on another (see
:class:`dispatcher.worker.Dispatcher`), so claims never wait behind a commit's fsync and
one thread owns the dispatcher's writes; the capture writer uses another connection and
SQLite serialises the two writers.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from common import sqlfile
from outbox import store

D = sqlfile.load("outbox", "dispatch.sql")


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


@dataclass(slots=True)
class EndpointState:
    name: str
    state: str  # active | paused | disabled
    failures: int
    paused_until: float
    secret: str | None
    updated_at: float  # when this state was last written (by us or by the CLI)


class DeliveryStore:
    def __init__(self, path: str | Path) -> None:
        self.conn = store.open_outbox(path)  # writes: attempts, delivery and endpoint state
        self.conn.execute("PRAGMA busy_timeout=60000")  # capture may hold the lock a while
        # Claims read on a connection of their own, so they never queue behind an fsync.
        self.reader = store.connect(path)
        self._data_version = -1

    def changed(self) -> bool:
        """Whether another connection committed since the last call (cheap to poll)."""
        version = int(self.reader.execute("PRAGMA data_version").fetchone()[0])
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
        with _txn(self.conn):
            self.conn.execute(D["record_attempts"], {"batch": batch})
            self.conn.execute(D["finish_deliveries"], {"batch": batch})

    def endpoint(self, name: str) -> EndpointState:
        row = self.conn.execute(D["endpoint_state"], (name,)).fetchone()
        if row is None:
            self.conn.execute(store.Q["register_endpoint"], (name, time.time()))
            return EndpointState(name, "active", 0, 0.0, None, 0.0)
        return EndpointState(*row)

    def save_endpoint(self, state: EndpointState) -> None:
        with _txn(self.conn):
            self.conn.execute(
                D["set_endpoint_state"],
                {
                    "name": state.name,
                    "state": state.state,
                    "failures": state.failures,
                    "paused_until": state.paused_until,
                    "now": state.updated_at,
                },
            )

    def close(self) -> None:
        self.reader.close()
        self.conn.close()


class _txn:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
