"""Where an export hands over to the events cursor: the last event id whose change the
export's snapshot already holds, so that a client reading the export and then
``/events?last_event_id=<it>`` sees every change committed after the snapshot and none
committed before it.

Postgres orders the WAL by commit record but makes transactions visible in a slightly
different order, so an LSN does not cut the outbox cleanly.  Visibility does: the
snapshot (``xmin:xmax:xip``) says of every source transaction id whether the export saw
it.  Once capture has passed the snapshot's WAL position, every transaction the snapshot
saw is in the outbox; the events of the first transaction it did not see begin the
tail.  :func:`cut` is that decision on plain values; :func:`cut_after` reads what it needs
in one SQLite read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from common import sqlfile
from common.snapshot import Snapshot

H = sqlfile.load("outbox", "handover.sql")

# How far before the newest event id read before the snapshot the classification looks:
# a transaction can reach the outbox a moment before Postgres makes it visible.
LOOKBACK = 1000


@dataclass(frozen=True, slots=True)
class Cut:
    """``resume``: the last event id the snapshot holds.  ``clean``: no event the snapshot
    saw comes after an event it did not see (else a few events after ``resume`` repeat a
    change the snapshot holds)."""

    resume: int
    clean: bool


def cut(snapshot: Snapshot, events: Iterable[tuple[int, int | None]], newest: int) -> Cut:
    """The cut of ``events`` (``(id, xid)`` in id order, from a point every earlier event
    of which the snapshot saw, up to ``newest``) by ``snapshot``: just before the first
    event it did not see, or ``newest`` when it saw them all.  Events without an xid
    (derived, manual, backfill) hold no source change and are passed by.  Reads the
    events once, holding none of them."""
    first_unseen: int | None = None
    clean = True
    for event_id, xid in events:
        if xid is None:
            continue
        if not snapshot.sees(xid):
            if first_unseen is None:
                first_unseen = event_id
        elif first_unseen is not None:
            clean = False
            break
    if first_unseen is None:
        return Cut(newest, True)
    return Cut(first_unseen - 1, clean)


# -- reads ----------------------------------------------------------------------------------


def newest_event_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute(H["newest_event_id"]).fetchone()[0])


def capture_passed(conn: sqlite3.Connection, slot: str, lsn: int) -> bool:
    """Whether the slot's checkpoint (committed with its events) is at or past ``lsn``."""
    row = conn.execute(H["checkpoint_lsn"], (slot,)).fetchone()
    return row is not None and int(row[0]) >= lsn


def cut_after(conn: sqlite3.Connection, snapshot: Snapshot, base: int) -> Cut:
    """:func:`cut` of the events from ``base`` - :data:`LOOKBACK` on (``base``: the newest
    event id read before the snapshot was taken), in one read transaction: the newest id
    and the events come from one state of the outbox."""
    conn.execute("BEGIN")
    try:
        newest = newest_event_id(conn)
        rows = conn.execute(H["source_xids"], {"after": max(0, base - LOOKBACK), "upto": newest})
        return cut(snapshot, rows, newest)
    finally:
        conn.execute("COMMIT")
