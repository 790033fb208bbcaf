"""The state of derived events, kept in the outbox beside the events themselves.

JSON values by (kind, key), each optionally filed under a ``ref`` (found by it) and a
``due`` time (found in order of it): cart timers and items, analytics periods.
:class:`SqliteState` writes inside the writer's open transaction, so a timer and the event
it fires commit together with the checkpoint; :class:`MemoryState` is the same store in a
dict, for tests of the logic above it (both pass one contract test).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from common import sqlfile
from common.jsontext import dumps, loads

S = sqlfile.load("outbox", "state.sql")


Row = tuple[str, str | None, float | None]  # value (JSON text), ref, due
HELD = 10_000  # changes held in memory at most: past this they go into the open transaction


class SqliteState:
    """On the writer's connection.  Changes wait in memory until the writer's group commit
    calls :meth:`flush` (as the shadow does), so the write lock is taken only while
    committing; reads see them.  ``begin`` opens the writer's transaction."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        begin: Callable[[], None],
        before_read: Callable[[], None] | None = None,
    ) -> None:
        """``before_read``: called before each read of the connection (the writer's: it
        waits for a statement its thread is running)."""
        self.conn = conn
        self.begin = begin
        self._before_read = before_read
        self._changed: dict[str, dict[str, Row | None]] = {}  # kind -> key -> row (None: deleted)
        self._refs: dict[tuple[str, str], set[str]] = {}  # (kind, ref) -> keys changed under it

    @property
    def pending(self) -> bool:
        return any(self._changed.values())

    def state_get(self, kind: str, key: str) -> Any | None:
        mine = self._changed.get(kind)
        if mine is not None and key in mine:
            row = mine[key]
            return None if row is None else loads(row[0])
        self._read()
        found = self.conn.execute(S["get"], {"kind": kind, "key": key}).fetchone()
        return None if found is None else loads(found[0])

    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None:
        rows = self._changed.setdefault(kind, {})
        rows[key] = (dumps(value).decode(), ref, due)
        if ref is not None:
            self._refs.setdefault((kind, ref), set()).add(key)
        if len(rows) > HELD:
            self.flush()  # a transaction touching a million carts: memory stays bounded

    def state_delete(self, kind: str, key: str) -> None:
        rows = self._changed.setdefault(kind, {})
        rows[key] = None
        if len(rows) > HELD:
            self.flush()

    def state_by_ref(self, kind: str, ref: str) -> list[Any]:
        mine = self._changed.get(kind, {})
        self._read()
        found = {k: v for k, v in self.conn.execute(S["by_ref"], {"kind": kind, "ref": ref}) if k not in mine}
        for key in self._refs.get((kind, ref), ()):
            row = mine.get(key)
            if row is not None and row[1] == ref:
                found[key] = row[0]
        return [loads(found[k]) for k in sorted(found)]

    def _stored_due(self, kind: str, until: float | None, limit: int) -> list[tuple[float, str, str]]:
        """Up to ``limit`` stored rows by due time, passing over those changed since."""
        mine = self._changed.get(kind, {})
        self._read()
        rows = self.conn.execute(
            S["due"], {"kind": kind, "until": until if until is not None else float("inf")}
        )
        found = []
        for key, value, due in rows:  # read lazily: only as far as needed
            if key in mine:
                continue
            found.append((float(due), key, value))
            if len(found) >= limit:
                break
        return found

    def state_due(self, kind: str, until: float, limit: int) -> list[Any]:
        found = self._stored_due(kind, until, limit)
        for key, row in self._changed.get(kind, {}).items():
            if row is not None and row[2] is not None and row[2] <= until:
                found.append((row[2], key, row[0]))
        return [loads(v) for _, _, v in sorted(found)[:limit]]

    def state_next_due(self, kind: str) -> float | None:
        dues = [d for d, _, _ in self._stored_due(kind, None, 1)]
        dues += [r[2] for r in self._changed.get(kind, {}).values() if r is not None and r[2] is not None]
        return min(dues) if dues else None

    def state_count(self, kind: str) -> tuple[int, int]:
        """(values, of which due) of one kind, as last committed."""
        self._read()
        total, due = self.conn.execute(S["count"], {"kind": kind}).fetchone()
        return int(total), int(due)

    def state_refs(self, kind: str, limit: int) -> set[str] | None:
        """Every ref of ``kind`` in use (stored or held), or None past ``limit``.  A stored
        ref whose row was changed since still counts: a superset is what callers need."""
        self._read()
        refs = {r for (r,) in self.conn.execute(S["refs"], {"kind": kind, "limit": limit + 1})}
        refs |= {ref for (kd, ref), keys in self._refs.items() if kd == kind and keys}
        return None if len(refs) > limit else refs

    def _read(self) -> None:
        if self._before_read is not None:
            self._before_read()

    def flush(self) -> None:
        """Write the changes, inside the writer's transaction (its commit calls this)."""
        if not self.pending:
            return
        self.begin()
        puts, deletes = [], []
        for kind, rows in self._changed.items():
            for key, row in rows.items():
                if row is None:
                    deletes.append({"kind": kind, "key": key})
                else:
                    puts.append({"kind": kind, "key": key, "value": row[0], "ref": row[1], "due": row[2]})
        if puts:
            self.conn.executemany(S["put"], puts)
        if deletes:
            self.conn.executemany(S["delete"], deletes)
        self.forget()

    def forget(self) -> None:
        """Drop the changes not yet flushed (the writer rolled back, or they are written)."""
        self._changed.clear()
        self._refs.clear()


class MemoryState:
    """:class:`SqliteState` in a dict (no transaction: tests of the logic above it)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[str, str | None, float | None]] = {}

    def state_get(self, kind: str, key: str) -> Any | None:
        row = self.rows.get((kind, key))
        return None if row is None else loads(row[0])

    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None:
        self.rows[(kind, key)] = (dumps(value).decode(), ref, due)

    def state_delete(self, kind: str, key: str) -> None:
        self.rows.pop((kind, key), None)

    def state_by_ref(self, kind: str, ref: str) -> list[Any]:
        found = sorted((k, v) for (kd, k), (v, r, _) in self.rows.items() if kd == kind and r == ref)
        return [loads(v) for _, v in found]

    def state_due(self, kind: str, until: float, limit: int) -> list[Any]:
        found = sorted(
            (d, k, v)
            for (kd, k), (v, _, d) in self.rows.items()
            if kd == kind and d is not None and d <= until
        )
        return [loads(v) for _, _, v in found[:limit]]

    def state_next_due(self, kind: str) -> float | None:
        dues = [d for (kd, _), (_, _, d) in self.rows.items() if kd == kind and d is not None]
        return min(dues) if dues else None

    def state_refs(self, kind: str, limit: int) -> set[str] | None:
        refs = {r for (kd, _), (_, r, _) in self.rows.items() if kd == kind and r is not None}
        return None if len(refs) > limit else refs

    def state_count(self, kind: str) -> tuple[int, int]:
        rows = [d for (kd, _), (_, _, d) in self.rows.items() if kd == kind]
        return len(rows), sum(d is not None for d in rows)
