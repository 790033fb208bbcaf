"""Backfill jobs in the outbox: requested by ``ct1-cdc backfill`` (or ``setup
--backfill``, ``recover``), run by capture, watched by ``backfill status``.

One job per table.  Capture is the only writer of a job's progress, and writes it in the
group commit that holds the events of the chunk it read (:meth:`OutboxWriter.backfill_update`),
so after a crash a job goes on after the last chunk whose events are in the outbox.  Other
processes only add jobs and ask for a cancel (a column capture never writes).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from common import sqlfile
from common.errors import SetupError
from common.jsontext import dumps, loads
from outbox.store import transaction

S = sqlfile.load("outbox", "backfills.sql")
ACTIVE = ("queued", "running")


def add(
    conn: sqlite3.Connection,
    tables: list[str],
    condition: str | None,
    rate: float,
    reason: str,
    *,
    unless_busy: bool = False,
) -> list[dict[str, Any]]:
    """Queue one job per table under one request (in a transaction of its own, or in
    the caller's when one is open); the jobs as :func:`jobs` gives them.  With
    ``unless_busy``, a table with a job still active (and not asked to stop) refuses the
    whole request, checked in the same transaction."""

    def queue() -> list[int]:
        if unless_busy:
            busy = sorted({j["table"] for j in active(conn) if not j["cancel_requested_at"]} & set(tables))
            if busy:
                raise SetupError(
                    f"a backfill of {', '.join(busy)} is already running: "
                    "`ct1-cdc backfill status`, or `ct1-cdc backfill cancel` first"
                )
        return _add(conn, tables, condition, rate, reason)

    if conn.in_transaction:
        ids = queue()
    else:
        with transaction(conn):
            ids = queue()
    return [j for j in jobs(conn, ids[0]) if j["id"] in ids] if ids else []


def _add(
    conn: sqlite3.Connection, tables: list[str], condition: str | None, rate: float, reason: str
) -> list[int]:
    now = time.time()
    ids = []
    for table in tables:
        params = {
            "request": 0,
            "tbl": table,
            "condition": condition,
            "rate": rate,
            "reason": reason,
            "now": now,
        }
        ids.append(int(conn.execute(S["insert"], params).lastrowid or 0))
    if ids:
        conn.execute(S["set_request"], {"request": ids[0], "last": ids[-1]})
    return ids


def active(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Jobs queued or running, oldest first."""
    return [_job(r) for r in _rows(conn, S["active"], {})]


def jobs(conn: sqlite3.Connection, request: int | None = None) -> list[dict[str, Any]]:
    """The jobs of ``request`` (default: the latest request)."""
    if request is None:
        request = conn.execute(S["last_request"]).fetchone()[0]
        if request is None:
            return []
    return [_job(r) for r in _rows(conn, S["of_request"], {"request": request})]


def recent(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs of any request, oldest first."""
    return [_job(r) for r in reversed(_rows(conn, S["recent"], {"limit": limit}))]


def update(
    conn: sqlite3.Connection,
    job: int,
    *,
    state: str | None = None,
    after: list[Any] | None = None,
    reread: list[list[Any]] | None = None,
    rows: int | None = None,
    events: int | None = None,
    total: int | None = None,
    error: str | None = None,
) -> None:
    """A job's progress; inside the caller's transaction (capture's group commit)."""
    conn.execute(
        S["update"],
        {
            "id": job,
            "state": state,
            "after_key": None if after is None else dumps(after).decode(),
            "reread": None if reread is None else dumps(reread).decode(),
            "rows_done": rows,
            "events": events,
            "total": total,
            "error": error,
            "now": time.time(),
        },
    )


def stop_active(conn: sqlite3.Connection, state: str, error: str) -> None:
    """End every active job now (in the caller's transaction): capture's own decision,
    e.g. a lost slot makes every row worth reading again."""
    conn.execute(S["stop_active"], {"state": state, "error": error, "now": time.time()})


def cancel(conn: sqlite3.Connection, request: int | None = None) -> int:
    """Stop the active jobs (of ``request``, or all): a queued one at once, a running one
    at capture's next chunk; how many there were."""
    with transaction(conn):
        return int(conn.execute(S["cancel"], {"request": request, "now": time.time()}).rowcount)


def _rows(conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cur = conn.execute(query, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _job(row: dict[str, Any]) -> dict[str, Any]:
    row["table"] = row.pop("tbl")
    after = row.pop("after_key")
    row["after"] = None if after is None else loads(after)
    reread = row.pop("reread")
    row["reread"] = [] if reread is None else loads(reread)
    return row
