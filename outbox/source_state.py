"""What the outbox keeps about the source besides events.

* the replica identities ``setup`` changed, so ``detach`` can put them back;
* the mapping problems capture found while running (a rule broken by DDL), which
  ``/readyz``, ``/metrics`` and ``ct1-cdc slot status`` show from any process;
* the transactions an operator asked capture to skip (``ct1-cdc slot skip``).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from common import sqlfile
from outbox.store import transaction

S = sqlfile.load("outbox", "source_state.sql")


def record_identity_change(
    conn: sqlite3.Connection, table: str, schema: str, name: str, identity: str, index: str | None
) -> None:
    """Remember a table's replica identity before setup changes it (the first one wins)."""
    with transaction(conn):
        conn.execute(S["record_identity_change"], (table, schema, name, identity, index, time.time()))


def identity_changes(conn: sqlite3.Connection) -> list[tuple[str, str, str, str, str | None]]:
    """``(table, schema, name, previous identity, index)`` of every change setup made."""
    return [tuple(r) for r in conn.execute(S["identity_changes"]).fetchall()]


def forget_identity_change(conn: sqlite3.Connection, table: str) -> None:
    with transaction(conn):
        conn.execute(S["forget_identity_change"], (table,))


def set_problems(conn: sqlite3.Connection, problems: list[dict[str, Any]]) -> None:
    """Replace the stored mapping problems; one already stored keeps its ``since``."""
    old = {(p["kind"], p["table"], p["rule"], p["message"]): p["since"] for p in problems_of(conn)}
    now = time.time()
    with transaction(conn):
        conn.execute(S["clear_problems"])
        conn.executemany(
            S["insert_problem"],
            [
                (
                    p["kind"],
                    p["table"],
                    p["rule"],
                    p["message"],
                    p["fix"],
                    old.get((p["kind"], p["table"], p["rule"], p["message"]), now),
                )
                for p in problems
            ],
        )


def problems_of(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    try:
        rows = conn.execute(S["problems"]).fetchall()
    except sqlite3.OperationalError:  # an outbox of an older version, opened read-only
        return []
    keys = ("kind", "table", "rule", "message", "fix", "since")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def problem_count(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.execute(S["count_problems"]).fetchone()[0])
    except sqlite3.OperationalError:  # an outbox older than the table
        return 0


def request_skip(conn: sqlite3.Connection, xid: int, at: float | None = None) -> None:
    with transaction(conn):
        conn.execute(S["request_skip"], (xid, time.time() if at is None else at))


def skipped_elsewhere(conn: sqlite3.Connection, xid: int, lsn: str, changes: int, at: float) -> None:
    """A skip another capture host made (read from the state stream), inside the caller's
    transaction: asked and done."""
    conn.execute(S["request_skip"], (xid, at))
    conn.execute(S["mark_skipped"], (at, lsn, changes, xid))


def pending_skips(conn: sqlite3.Connection) -> set[int]:
    return {int(r[0]) for r in conn.execute(S["pending_skips"]).fetchall()}


def mark_skipped(conn: sqlite3.Connection, xid: int, lsn: str, changes: int) -> None:
    """Run inside capture's group commit (``OutboxWriter.mark_skipped``): durable with
    the checkpoint that passes the transaction."""
    conn.execute(S["mark_skipped"], (time.time(), lsn, changes, xid))


def skips(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    keys = ("xid", "requested_at", "skipped_at", "lsn", "changes")
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(S["skips"]).fetchall()]
