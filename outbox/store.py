"""The SQLite outbox: connections, schema and migrations, routing, and reads.

Events are appended through :class:`outbox.writer.OutboxWriter` (capture's, and the
API's for manual events); readers open their own connections (WAL mode lets them read
while a writer writes).
"""

from __future__ import annotations

import fnmatch
import functools
import heapq
import itertools
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import jsontext, sqlfile
from common.errors import Ct1Error

Q = sqlfile.load("outbox", "queries.sql")
MIGRATIONS = sqlfile.load("outbox", "migrations.sql")
SCHEMA_VERSION = max(int(n) for n in MIGRATIONS)
# A row of attempt_batches (first-try successes) spans at most this many event ids, so
# the batch holding an event is found in a short range of its index.
BATCH_SPAN = 10_000


class OutboxError(Ct1Error):
    """The outbox file cannot be opened or written."""


PAGE_SIZE = 16384
# After a checkpoint has copied everything back, the next write truncates a WAL file larger
# than this (a million-row source transaction leaves gigabytes otherwise, for good).
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the outbox with the pragmas every connection needs."""
    p = Path(path)
    try:
        if readonly:
            if not p.exists():
                raise OutboxError(f"outbox {p} does not exist: run `ct1-cdc setup` first")
            conn = sqlite3.connect(
                f"file:{p}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(p, isolation_level=None, check_same_thread=False)
            # first: two processes opening a new outbox at once wait for each other's
            # journal-mode switch instead of failing with "database is locked"
            conn.execute("PRAGMA busy_timeout=10000")
            # A new outbox gets 16 KiB pages: events of ~1 KB and the delivery indexes take
            # fewer page splits and b-tree levels per append (capture's SQLite time −10 %,
            # docs/benchmarks.md).  An existing file keeps its page size.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            _wal_mode(conn)
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot open outbox {p}: {exc}") from exc
    return conn


def _wal_mode(conn: sqlite3.Connection, within: float = 10.0) -> None:
    """Switch to WAL.  On a new file another connection may be switching it at the same
    moment, and SQLite then answers "locked" at once instead of waiting: try again."""
    deadline = time.monotonic() + within
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than ``PRAGMA user_version``; return the version."""
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > SCHEMA_VERSION:
        raise OutboxError(
            f"outbox schema version {current} is newer than this ct1-cdc knows ({SCHEMA_VERSION})"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another process may have applied it while this one waited for the lock
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(MIGRATIONS[str(version)]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _statements(script: str) -> list[str]:
    """Split a script into statements (semicolons in comments and strings do not count)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer)
            buffer = ""
    if buffer.strip():
        statements.append(buffer + ";")
    return [s for s in statements if s.strip().strip(";").strip()]


def open_outbox(path: str | Path) -> sqlite3.Connection:
    conn = connect(path)
    migrate(conn)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an outbox connection (they run in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def check_writable(conn: sqlite3.Connection, busy_ms: int = 2000) -> None:
    """Take the write lock and give it back, writing nothing; raises when the outbox
    cannot be written within ``busy_ms`` (``/readyz``).  Not inside a transaction."""
    busy = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.execute(f"PRAGMA busy_timeout={busy}")


def data_version(conn: sqlite3.Connection) -> int:
    """A number that changes when another connection commits (cheap to poll)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


@dataclass(frozen=True, slots=True)
class Route:
    """An endpoint as the outbox sees it: a name and the event globs it receives."""

    name: str
    globs: tuple[str, ...]


# Types every endpoint receives, whatever its events globs: history lost with a slot
# concerns every receiver.
TO_EVERY_ENDPOINT = frozenset({"ct1.gap"})


def routes_of(endpoints: Iterable[Any]) -> list[Route]:
    """The enabled endpoints of the settings (``name``, ``events``, ``enabled``) as routes."""
    return [Route(e.name, tuple(e.events)) for e in endpoints if e.enabled]


class Router:
    """Which endpoints receive an event type (cached: types are few)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = list(routes)
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._routes]

    def endpoints(self, event_type: str) -> tuple[str, ...]:
        hit = self._cache.get(event_type)
        if hit is None and event_type in TO_EVERY_ENDPOINT:
            hit = self._cache[event_type] = tuple(r.name for r in self._routes)
        if hit is None:
            hit = tuple(
                r.name for r in self._routes if any(fnmatch.fnmatchcase(event_type, g) for g in r.globs)
            )
            self._cache[event_type] = hit
        return hit


def dumps(value: Any) -> str:
    """JSON text of anything the outbox stores: lossless (integers past 64 bits, any
    depth, json/jsonb columns as the JSON Postgres holds; see common.jsontext)."""
    return jsontext.dumps(value).decode("utf-8")


# -- reads ----------------------------------------------------------------------------------


def envelope_json(row: Sequence[Any]) -> str:
    """One envelope as JSON text, from a ``list_events``/``get_event`` row."""
    event_id, type_, occurred_at, data, table, op, lsn, xid = row
    source = dumps({"table": table, "op": op, "lsn": lsn, "xid": xid})
    return (
        f'{{"id":{event_id},"type":{dumps(type_)},"timestamp":{dumps(occurred_at)},'
        f'"data":{data},"source":{source}}}'
    )


def iter_events(
    conn: sqlite3.Connection,
    *,
    after: int = 0,
    types: Sequence[str] = (),
    limit: int | None = None,
    page: int = 1000,
) -> Iterator[tuple[Any, ...]]:
    """Events with id > ``after``, oldest first; ``types`` are exact names or globs."""
    remaining = limit
    last = after
    while remaining is None or remaining > 0:
        rows = conn.execute(Q["list_events"], {"after": last, "limit": page}).fetchall()
        if not rows:
            return
        for row in rows:
            last = row[0]
            if types and not any(fnmatch.fnmatchcase(row[1], t) for t in types):
                continue
            yield row
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    return


def read_events(
    conn: sqlite3.Connection, *, after: int, types: Sequence[str], limit: int
) -> tuple[list[tuple[Any, ...]], int]:
    """Up to ``limit`` events after ``after`` whose type matches one of ``types`` (names or
    globs; none: every event), oldest first, and the id the read got to: the last event
    returned when the page is full, else the newest event id, so a reader continuing from
    there skips what did not match and misses nothing.

    Bounded whatever the patterns: the patterns are matched against the outbox's distinct
    types (one index seek each), then each matching type gives at most ``limit`` ids from
    ``events_type_id``; the rows read are at most ``limit`` per matching type, never a scan
    of the events in between.  One read transaction: every figure comes from one snapshot.
    """
    conn.execute("BEGIN")
    try:
        newest = newest_event_id(conn)
        if not types:
            rows = conn.execute(Q["list_events"], {"after": after, "limit": limit}).fetchall()
        else:
            match = type_matcher(tuple(types))
            matched = [t for (t,) in conn.execute(Q["event_types"]) if match(t)]
            id_lists = [_ids_of_type(conn, t, after, newest, limit) for t in matched]
            ids = list(itertools.islice(heapq.merge(*id_lists), limit))
            rows = conn.execute(Q["events_by_ids"], {"ids": dumps(ids)}).fetchall() if ids else []
    finally:
        conn.execute("COMMIT")
    got_to = rows[-1][0] if len(rows) == limit else max(newest, after)
    return rows, got_to


@functools.lru_cache(maxsize=256)
def type_matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One compiled test for a set of names or globs (readers repeat the same filters)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


def _ids_of_type(conn: sqlite3.Connection, type_: str, after: int, upto: int, limit: int) -> list[int]:
    params = {"type": type_, "after": after, "upto": upto, "limit": limit}
    return [i for (i,) in conn.execute(Q["type_event_ids"], params)]


EVERY_TABLE: frozenset[str] = frozenset({"*"})


def newest_event_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute(Q["newest_event_id"]).fetchone()[0])


def tables_changed_since(conn: sqlite3.Connection, seen: int, limit: int) -> tuple[frozenset[str], int]:
    """The source tables of the events after ``seen`` and the newest id; when there are
    more than ``limit`` of them, :data:`EVERY_TABLE` (reading at most ``limit`` + 1 rows)."""
    rows = conn.execute(Q["tables_since"], {"after": seen, "limit": limit + 1}).fetchall()
    if len(rows) > limit:
        return EVERY_TABLE, newest_event_id(conn)
    return frozenset(t for _, t in rows if t), max((i for i, _ in rows), default=seen)


def status_history(conn: sqlite3.Connection, order_key: str, limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` captured ``order.status_changed`` events of one order (its key
    as text, as events store it), oldest first: each with its event id, commit time, new
    status and previous status (None when capture did not know it)."""
    rows = conn.execute(Q["status_history"], {"key": order_key, "limit": limit}).fetchall()
    return [
        {"event_id": event_id, "changed_at": at, "status": status, "previous_status": previous}
        for event_id, at, status, previous in reversed(rows)
    ]


def checkpoint_of(conn: sqlite3.Connection, slot: str) -> tuple[int, float] | None:
    """The slot's checkpoint LSN and when capture committed it, if it has one."""
    row = conn.execute(Q["checkpoint_of"], (slot,)).fetchone()
    return None if row is None else (int(row[0]), float(row[1]))


def get_event(conn: sqlite3.Connection, event_id: int) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(Q["get_event"], (event_id,)).fetchone()
    return row


def event_deliveries(conn: sqlite3.Connection, event_id: int) -> list[dict[str, Any]]:
    cur = conn.execute(Q["event_deliveries"], {"id": event_id, "span": BATCH_SPAN})
    return [
        {"endpoint": e, "status": s, "attempts": a, "next_attempt_at": n} for e, s, a, n in cur.fetchall()
    ]


def endpoint_status(conn: sqlite3.Connection, names: Iterable[str], now: float) -> list[dict[str, Any]]:
    """Every endpoint configured (``names``) or known to the outbox, by name: its stored
    state, deliveries by status, attempts and 2xx answers over the last hour and day,
    and its last attempt (``attempted_at, event_id, status, duration_ms, error``)."""
    states = {r[0]: r[1:] for r in conn.execute(Q["endpoint_states"])}
    counts: dict[str, dict[str, int]] = {}
    for endpoint, status, n in conn.execute(Q["stats_deliveries"], {"span": BATCH_SPAN}):
        counts.setdefault(endpoint, {})[status] = n
    hour = {e: (n, ok) for e, n, ok in conn.execute(Q["attempt_counts"], {"since": now - 3600})}
    day = {e: (n, ok) for e, n, ok in conn.execute(Q["attempt_counts"], {"since": now - 86400})}
    out = []
    for name in sorted(set(names) | set(states)):
        state, failures, paused_until = states.get(name, ("active", 0, 0.0))
        by_status = counts.get(name, {})
        out.append(
            {
                "name": name,
                "state": state,
                "failures": failures,
                "paused_until": paused_until,
                "pending": by_status.get("pending", 0),
                "dead": by_status.get("dead", 0),
                "delivered": by_status.get("delivered", 0),
                "attempts_1h": hour.get(name, (0, 0)),
                "attempts_24h": day.get(name, (0, 0)),
                "last_attempt": conn.execute(Q["last_attempt"], {"endpoint": name}).fetchone(),
            }
        )
    return out


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    events, last_id, first_at, last_at = conn.execute(Q["stats_totals"]).fetchone()
    by_type = {t: n for t, n, _ in conn.execute(Q["stats_by_type"]).fetchall()}
    deliveries: dict[str, dict[str, int]] = {}
    for endpoint, status, n in conn.execute(Q["stats_deliveries"], {"span": BATCH_SPAN}).fetchall():
        deliveries.setdefault(endpoint, {})[status] = n
    checkpoints = {slot: lsn for slot, lsn in conn.execute("SELECT slot, lsn FROM checkpoint").fetchall()}
    return {
        "events": events,
        "last_event_id": last_id,
        "first_at": first_at,
        "last_at": last_at,
        "events_by_type": by_type,
        "deliveries": deliveries,
        "checkpoints": checkpoints,
        "schema_version": int(conn.execute("PRAGMA user_version").fetchone()[0]),
    }
