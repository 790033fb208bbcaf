"""Export answers cached for a while, and dropped as soon as the outbox shows a change to
a table they were read from.

Before every lookup the cache reads which source tables the events committed since its
last look came from (``events.source_table``, by id, so the read is short) and drops
the entries that depend on them: a cached answer is never staler than the outbox.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    expires: float
    tables: frozenset[str]
    body: bytes


class ExportCache:
    def __init__(
        self,
        db: Callable[[], sqlite3.Connection],
        *,
        max_entries: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.max_entries = max_entries
        self.clock = clock
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.seen: int | None = None  # id of the last event looked at
        self.hits = 0
        self.misses = 0

    def _sync(self) -> None:
        conn = self.db()
        if self.seen is None:
            self.seen = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
            return
        rows = conn.execute(
            "SELECT source_table, max(id) FROM events WHERE id > ? GROUP BY source_table", (self.seen,)
        ).fetchall()
        if not rows:
            return
        self.seen = max(int(last) for _, last in rows)
        changed = {table for table, _ in rows if table}
        if changed and self.entries:
            changed.add("*")  # entries that depend on every table
            for key in [k for k, e in self.entries.items() if not e.tables.isdisjoint(changed)]:
                del self.entries[key]

    def get(self, key: str) -> bytes | None:
        self._sync()
        entry = self.entries.get(key)
        if entry is None or entry.expires <= self.clock():
            if entry is not None:
                del self.entries[key]
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry.body

    def put(self, key: str, tables: frozenset[str], ttl: float, body: bytes) -> None:
        if ttl <= 0:
            return
        self.entries[key] = Entry(self.clock() + ttl, tables, body)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
