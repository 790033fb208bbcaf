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
from pathlib import Path
from typing import Any

from common import sqlfile
from common.jsontext import dumps, loads

S = sqlfile.load(Path(__file__).resolve().parent / "sql" / "state.sql")


class SqliteState:
    """On the writer's connection; ``begin`` opens its transaction if none is open."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None]) -> None:
        self.conn = conn
        self.begin = begin

    def state_get(self, kind: str, key: str) -> Any | None:
        row = self.conn.execute(S["get"], {"kind": kind, "key": key}).fetchone()
        return None if row is None else loads(row[0])

    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None:
        self.begin()
        text = dumps(value).decode()
        self.conn.execute(S["put"], {"kind": kind, "key": key, "value": text, "ref": ref, "due": due})

    def state_delete(self, kind: str, key: str) -> None:
        self.begin()
        self.conn.execute(S["delete"], {"kind": kind, "key": key})

    def state_by_ref(self, kind: str, ref: str) -> list[Any]:
        return [loads(v) for (v,) in self.conn.execute(S["by_ref"], {"kind": kind, "ref": ref})]

    def state_due(self, kind: str, until: float, limit: int) -> list[Any]:
        rows = self.conn.execute(S["due"], {"kind": kind, "until": until, "limit": limit})
        return [loads(v) for (v,) in rows]

    def state_next_due(self, kind: str) -> float | None:
        due = self.conn.execute(S["next_due"], {"kind": kind}).fetchone()[0]
        return None if due is None else float(due)

    def state_count(self, kind: str) -> tuple[int, int]:
        """(values, of which due) of one kind."""
        total, due = self.conn.execute(S["count"], {"kind": kind}).fetchone()
        return int(total), int(due)


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
