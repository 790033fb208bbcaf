"""Export answers cached for a while, and dropped as soon as the outbox shows a change to
a table they were read from.

Before every lookup the cache reads which source tables the events committed since its
last look came from (``events.source_table``, by id, at most :data:`SYNC_EVENTS` of them) and drops
the entries that depend on them: a cached answer is never staler than the outbox.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from outbox import store

SYNC_EVENTS = 1000  # new events one lookup looks at; past that, the whole cache is dropped


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
        """Drop what captured changes made stale.  Runs on the loop, so it looks at no more
        than :data:`SYNC_EVENTS` new events: past that many, every entry goes."""
        conn = self.db()
        if self.seen is None:
            self.seen = store.newest_event_id(conn)
            return
        changed, self.seen = store.tables_changed_since(conn, self.seen, SYNC_EVENTS)
        if changed and self.entries:
            if changed is store.EVERY_TABLE:
                self.entries.clear()
                return
            changed = changed | {"*"}  # entries that depend on every table
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
