"""The position an export hands over to ``/events`` at (``meta.resume_event_id``, the
``CT1-Resume-Event-Id`` header): a client that reads the export and then the events after
it sees every change committed after the export's snapshot and none committed before it.

The export reads in one ``REPEATABLE READ, READ ONLY`` transaction whose first statement
takes the snapshot and the WAL insert position W right after it (:meth:`Handover.seam`).
Every transaction that snapshot sees committed before W, so once capture has passed W
(the slot's confirmed position, or the outbox checkpoint) all their events are in the
outbox, and :func:`outbox.handover.cut_after` finds the last event id the snapshot holds by
transaction visibility, not by LSN (Postgres makes transactions visible in an order that
differs slightly from their commit records).  The seam emits capture's heartbeat, so an
idle capture confirms past W at once; the wait is bounded by ``api.resume_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog

from common import sqlfile
from common.formats import format_lsn, parse_lsn
from common.snapshot import Snapshot
from outbox import handover
from outbox.handover import Cut

log = structlog.get_logger("ct1_cdc.api")

S = sqlfile.load("api", "seam.sql")
ATTEMPTS = 3  # snapshots taken before an unclean cut is accepted (a rare race)
POLL_SECONDS = 0.05
PG13 = 130000  # before it: txid_current_snapshot(), the same text

Offload = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]
Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Seam:
    snapshot: Snapshot
    lsn: int  # the WAL insert position read right after the snapshot was taken
    base: int  # the newest event id, read before the snapshot was taken


class Handover:
    def __init__(self, slot: str, wait_seconds: float) -> None:
        self.slot = slot
        self.wait_seconds = wait_seconds

    async def read(
        self,
        transaction: Callable[[], AbstractAsyncContextManager[Conn]],
        offload: Offload,
        reads: Callable[[Conn, int | None], Awaitable[T]],
    ) -> T:
        """``reads(conn, resume)`` in a new ``transaction()`` made repeatable-read, given
        the cut of its snapshot.  A cut that is not clean (a transaction the snapshot saw
        reached the outbox after one it did not: a rare race) is tried again with a new
        snapshot, then accepted: nothing is lost, a few events after it repeat a change."""
        for attempt in range(1, ATTEMPTS + 1):
            async with transaction() as conn:
                seam = await self.seam(conn, offload)
                cut = None if seam is None else await self.cut(conn, seam, offload)
                if cut is not None and not cut.clean:
                    if attempt < ATTEMPTS:
                        continue
                    log.warning("export_resume_overlap", resume_event_id=cut.resume, attempts=attempt)
                return await reads(conn, None if cut is None else cut.resume)
        raise AssertionError("unreachable: the last attempt returns")

    async def seam(self, conn: Conn, offload: Offload) -> Seam | None:
        """Make the transaction just begun on ``conn`` a repeatable-read, read-only one and
        take its snapshot with the statement that starts it.  None when the database cannot
        tell (a standby has no WAL insert position): the export goes on without a position."""
        base: int = await offload(handover.newest_event_id)
        await conn.execute(S["repeatable_read"])
        row = await _first_row(conn, _for(conn, S["seam"]))
        if row is None:  # e.g. a role refused the message: the export goes on without it
            row = await _first_row(conn, _for(conn, S["seam_quiet"]))
        if row is None:
            return None
        return Seam(Snapshot.parse(row[0]), parse_lsn(row[1]), base)

    async def cut(self, conn: Conn, seam: Seam, offload: Offload) -> Cut | None:
        """The cut of the outbox by the seam's snapshot, once capture has passed the seam;
        None when it has not within ``api.resume_wait_seconds`` (or no capture reads the
        slot, or there is no slot)."""
        if not await self._passed(conn, seam.lsn, offload):
            log.info("export_resume_unknown", slot=self.slot, lsn=format_lsn(seam.lsn))
            return None
        cut: Cut = await offload(
            functools.partial(handover.cut_after, snapshot=seam.snapshot, base=seam.base)
        )
        return cut

    async def _passed(self, conn: Conn, lsn: int, offload: Offload) -> bool:
        """Whether capture has passed ``lsn``, polled without blocking the loop until it
        has or the wait runs out.  A slot that is missing, or that no capture reads, will
        not move: no wait then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        passed = functools.partial(handover.capture_passed, slot=self.slot, lsn=lsn)
        while True:
            cur = await conn.execute(S["slot_position"], (self.slot,))
            row = await cur.fetchone()
            if row is not None and row[0] is not None and parse_lsn(row[0]) >= lsn:
                return True
            if await offload(passed):
                return True
            if row is None or not row[1] or loop.time() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)


def _for(conn: Conn, query: str) -> str:
    if conn.info.server_version < PG13:
        return query.replace("pg_current_snapshot()", "txid_current_snapshot()")
    return query


async def _first_row(conn: Conn, query: str) -> tuple[Any, ...] | None:
    """The statement's row, inside a savepoint: when the database refuses it, the
    transaction (and its snapshot) stays usable."""
    try:
        async with conn.transaction():
            cur = await conn.execute(query)
            return await cur.fetchone()
    except psycopg.Error as exc:
        log.info("export_seam_refused", error=(exc.diag.message_primary or type(exc).__name__))
        return None
