"""The source's health for ``/readyz``, ``/stats`` and ``/metrics``: answered within about
:data:`CHECK_SECONDS` whatever the marketplace database does (down, refusing, or
accepting connections and never answering), with the cause.

Not the export pool: a request there waits ``api.pool_timeout_seconds`` for a connection
the pool cannot make, and says only that it waited.  One connection of its own instead,
kept between checks and made again when lost; one check at a time.  A healthy source
answers every check afresh (one short query); a failure is reused for
:data:`CACHE_SECONDS`, so a burst of health requests while the source is away waits for
one check, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psycopg

CHECK_SECONDS = 1.0  # a check gives up after this, with "no answer within 1 s"
CACHE_SECONDS = 1.0  # a failed check is reused this long
STATEMENT_TIMEOUT_MS = 1000

SLOT_SQL = (
    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


class SourceHealth:
    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._result: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._at = 0.0

    async def close(self) -> None:
        await self._drop()

    async def source(self) -> dict[str, Any]:
        """``{"ok": true}``, or ``{"ok": false, "error": ...}`` naming the cause."""
        return dict((await self.check())[0])

    async def slot_status(self) -> dict[str, Any]:
        """The slot exists, has not lost WAL, and its lag (``lag_bytes``, ``wal_status``)."""
        return dict((await self.check())[1])

    async def check(self) -> tuple[dict[str, Any], dict[str, Any]]:
        async with self._lock:  # concurrent callers wait for one check
            if self._result is not None and time.monotonic() - self._at < CACHE_SECONDS:
                return self._result  # the source was away a moment ago
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    result = await self._query()
            except TimeoutError:
                await self._drop()
                result = _down(f"no answer within {CHECK_SECONDS:g} s")
            except psycopg.Error as exc:
                await self._drop()
                result = _down(_first_line(exc))
            self._result = None if result[0]["ok"] else result
            self._at = time.monotonic()
            return result

    async def _query(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=2,  # libpq's least; the asyncio timeout above is the bound
                options=f"-c default_transaction_read_only=on -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="ct1-cdc-health",
            )
        cur = await self._conn.execute(SLOT_SQL, (self.slot,))
        row = await cur.fetchone()
        if row is None:
            slot: dict[str, Any] = {
                "ok": False,
                "lag_bytes": None,
                "wal_status": None,
                "error": f"slot {self.slot} not found",
            }
        else:
            slot = {"ok": row[1] != "lost", "lag_bytes": row[0], "wal_status": row[1]}
            if not slot["ok"]:
                slot["error"] = (
                    "the slot was invalidated (its WAL went past max_slot_wal_keep_size): changes after "
                    "capture's checkpoint are gone; to capture again: `ct1-cdc recover`"
                )
        return {"ok": True}, slot

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _down(reason: str) -> tuple[dict[str, Any], dict[str, Any]]:
    error = f"the marketplace database is unavailable: {reason}"
    return {"ok": False, "error": error}, {"ok": False, "lag_bytes": None, "wal_status": None, "error": error}
