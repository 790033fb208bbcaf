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


class SqliteState:
    """On the writer's connection.  Changes wait in memory until the writer's group commit
    calls :meth:`flush` (as the shadow does), so the write lock is taken only while
    committing; reads see them.  ``begin`` opens the writer's transaction."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None]) -> None:
        self.conn = conn
        self.begin = begin
        self._changed: dict[tuple[str, str], Row | None] = {}  # None: deleted

    @property
    def pending(self) -> bool:
        return bool(self._changed)

    def state_get(self, kind: str, key: str) -> Any | None:
        if (kind, key) in self._changed:
            row = self._changed[(kind, key)]
            return None if row is None else loads(row[0])
        found = self.conn.execute(S["get"], {"kind": kind, "key": key}).fetchone()
        return None if found is None else loads(found[0])

    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None:
        self._changed[(kind, key)] = (dumps(value).decode(), ref, due)

    def state_delete(self, kind: str, key: str) -> None:
        self._changed[(kind, key)] = None

    def _mine(self, kind: str) -> dict[str, Row | None]:
        return {k: row for (kd, k), row in self._changed.items() if kd == kind}

    def state_by_ref(self, kind: str, ref: str) -> list[Any]:
        mine = self._mine(kind)
        found = {k: v for k, v in self.conn.execute(S["by_ref"], {"kind": kind, "ref": ref}) if k not in mine}
        found.update({k: row[0] for k, row in mine.items() if row is not None and row[1] == ref})
        return [loads(found[k]) for k in sorted(found)]

    def state_due(self, kind: str, until: float, limit: int) -> list[Any]:
        mine = self._mine(kind)
        rows = self.conn.execute(S["due"], {"kind": kind, "until": until, "limit": limit + len(mine)})
        found = [(d, k, v) for k, v, d in rows if k not in mine]
        found += [
            (r[2], k, r[0]) for k, r in mine.items() if r is not None and r[2] is not None and r[2] <= until
        ]
        return [loads(v) for _, _, v in sorted(found)[:limit]]

    def state_next_due(self, kind: str) -> float | None:
        mine = self._mine(kind)
        rows = self.conn.execute(S["next_due"], {"kind": kind, "limit": len(mine) + 1})
        dues = [d for k, d in rows if k not in mine][:1]
        dues += [r[2] for r in mine.values() if r is not None and r[2] is not None]
        return min(dues) if dues else None

    def state_count(self, kind: str) -> tuple[int, int]:
        """(values, of which due) of one kind, as last committed."""
        total, due = self.conn.execute(S["count"], {"kind": kind}).fetchone()
        return int(total), int(due)

    def flush(self) -> None:
        """Write the changes, inside the writer's transaction (its commit calls this)."""
        if not self._changed:
            return
        self.begin()
        puts = [
            {"kind": kind, "key": key, "value": row[0], "ref": row[1], "due": row[2]}
            for (kind, key), row in self._changed.items()
            if row is not None
        ]
        deletes = [{"kind": kind, "key": key} for (kind, key), row in self._changed.items() if row is None]
        if puts:
            self.conn.executemany(S["put"], puts)
        if deletes:
            self.conn.executemany(S["delete"], deletes)
        self._changed.clear()

    def forget(self) -> None:
        """Drop the changes not yet flushed (the writer rolled back)."""
        self._changed.clear()


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

    def state_count(self, kind: str) -> tuple[int, int]:
        rows = [d for (kd, _), (_, _, d) in self.rows.items() if kd == kind]
        return len(rows), sum(d is not None for d in rows)
