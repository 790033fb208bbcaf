"""The outbox writer: the one owner of capture's SQLite writes (the capture thread).

A source transaction's events, their deliveries and the checkpoint LSN commit in one
SQLite transaction (WAL mode, synchronous=FULL); many small source transactions share one
commit.  Events go to SQLite in chunks of :data:`CHUNK` inside that transaction, so a huge
source transaction never sits in memory.

Event ids come from SQLite's AUTOINCREMENT inside ``BEGIN IMMEDIATE``: contiguous per
chunk, and another appender (the API's manual events) can never take the same id.

Capture's writer (``appends_on_thread``) hands each chunk of events to a native thread
(``outbox/append.py``): the rows are copied while capture holds the GIL, and inserted on
the same connection and in the same transaction without it, while capture decodes the next
ones.  Everything else on the connection waits for the queued rows first (:meth:`_settle`),
except reads of other tables.  Its group commits go the same way: the ``COMMIT`` (its
fsync) and the next ``BEGIN`` are queued behind the rows, :attr:`durable_lsn` and
:attr:`commits_durable` move once it is done, and capture confirms and wakes its readers
only then.  (A variant that handed chunks to a Python thread was slower:
the GIL went back and forth for every row.  See docs/benchmarks.md.)
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from common.jsontext import JsonText, loads
from common.jsontext import dumps as json_bytes
from common.metrics import EVENTS_APPENDED
from outbox import backfills, source_state
from outbox.append import Appender, appender_for, settle
from outbox.checkpointer import Checkpointer
from outbox.state import SqliteState
from outbox.store import TO_EVERY_ENDPOINT, OutboxError, Q, Router, dumps, transaction

CHUNK = 1000
SHADOW_BUFFER = 10_000  # shadow rows kept in memory before they go to SQLite
# In a stored shadow row: the columns whose values are json/jsonb text (JsonText), stored
# as strings so that reading the shadow back never parses them (any depth, any number).
# A column name never holds a NUL, so this key cannot be a column's.
SHADOW_JSON_COLUMNS = "\x00json"


class OutboxWriter:
    """Per group commit: :meth:`add` events of one or more source transactions, then
    :meth:`commit` with the end LSN of the last one.  :meth:`rollback` forgets everything
    not yet committed."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        router: Router,
        *,
        checkpointer: Checkpointer | None = None,
        rows_at_append: bool = False,
        appends_on_thread: bool = False,
    ) -> None:
        """``rows_at_append``: this writer chooses each event's endpoints itself (the API's
        manual events, narrowed by ``systems``) and writes their delivery rows at once;
        otherwise (capture) it appends events only, and the dispatcher makes the rows from
        each endpoint's cursor and the routes this writer keeps per event type.
        ``appends_on_thread``: events are inserted on a native thread where one can be had
        (capture's writer)."""
        self.conn = conn
        self.router = router
        self.rows_at_append = rows_at_append
        self._routed_types: set[str] = set()
        # Every delivery is inserted from the event row it names, in the same transaction:
        # the foreign-key lookup per delivery would only check what the INSERT ... SELECT
        # guarantees.
        conn.execute("PRAGMA foreign_keys=OFF")
        self.checkpointer = checkpointer
        if checkpointer is not None:  # WAL checkpoints on its thread, never inside our commits
            conn.execute("PRAGMA wal_autocheckpoint=0")
            checkpointer.start()
        self._durable_lsn = 0  # checkpoint of the last durable commit (what may be confirmed)
        self._commits = 0  # commits made
        self._commits_durable = 0
        self._committing: collections.deque[tuple[int, int]] = collections.deque()  # (ticket, lsn) queued
        self.last_event_id = 0  # id of the last event committed or written
        self.pending = 0  # events added since the last commit
        self._events: list[tuple[Any, ...]] = []
        self._shadow: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._in_txn = False
        self._state: SqliteState | None = None
        self._appender: Appender | None = None
        self._appending = False  # work queued on the appender since the last settle
        self._rows_queued = False  # of which rows
        conn.executemany(Q["register_endpoint"], [(name,) for name in router.names])
        if not rows_at_append:
            self._routes_from(router)
        if appends_on_thread and not rows_at_append:
            self._appender = appender_for(conn, Q["insert_event"])

    @property
    def durable_lsn(self) -> int:
        """The checkpoint of the last durable commit (or the one :meth:`checkpoint` read)."""
        if self._committing:
            self._poll_commits()
        return self._durable_lsn

    @property
    def commits_durable(self) -> int:
        """How many of this writer's commits are durable (all of them, but for a group
        commit still on the appender's thread)."""
        if self._committing:
            self._poll_commits()
        return self._commits_durable

    @property
    def appends_on_thread(self) -> bool:
        """Whether events are inserted on the native thread."""
        return self._appender is not None

    def _routes_from(self, router: Router) -> None:
        """Each endpoint of ``router`` gets a cursor (at the newest event, when it is new)
        and the routes are stated anew, for every type the outbox holds (events still
        waiting for their rows keep a route; an endpoint the configuration no longer names
        gets no further event): one commit, before any event of this writer."""
        with transaction(self.conn):
            self.conn.executemany(Q["register_cursor"], [(name,) for name in router.names])
            types = [row[0] for row in self.conn.execute(Q["event_types"])]
            self.conn.execute(Q["forget_routes"])
            self.conn.executemany(Q["add_route"], [(name, t) for t in types for name in router.endpoints(t)])
        self._routed_types = set(types)

    def add(
        self,
        type: str,
        object: str,
        entity_id: Any,
        data: dict[str, Any],
        occurred_at: str,
        table: str | None,
        op: str | None,
        lsn: str | None,
        xid: int | None,
        name: str | None = None,
        endpoints: Sequence[str] | None = None,
    ) -> None:
        """Buffer one event; its id and deliveries are assigned when the chunk is written.
        (Capture calls it positionally: it is the hot path.  ``name`` names the event for a
        sink that needs it: here its id does.  ``endpoints``: the event goes to these alone
        (those this writer's router knows), its rows made now; a manual event narrowed by
        ``systems``.)"""
        events = self._events
        key = None if entity_id is None else str(entity_id)
        chosen = None if endpoints is None else dumps(sorted(endpoints))
        events.append(
            (
                type,
                object,
                key,
                occurred_at,
                json_bytes(data).decode(),
                table,
                op,
                lsn,
                xid,
                time.time(),
                1 if self.rows_at_append or chosen is not None or type in TO_EVERY_ENDPOINT else 0,
                chosen,
            )
        )
        self.pending += 1
        if len(events) >= CHUNK:
            self._flush()

    # -- the shadow of watched columns (tables without REPLICA IDENTITY FULL) ----------------

    # Shadow changes wait in memory until the group commit (or until there are many), so
    # the write lock is held only while committing and the dispatcher is not kept waiting.

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        # (a read of another table: it need not wait for the queued events)
        if (table, key) in self._shadow:
            return self._shadow[(table, key)]
        self._before_read()
        row = self.conn.execute(Q["get_shadow"], (table, key)).fetchone()
        return None if row is None else shadow_values(row[0])

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self._shadow[(table, key)] = values
        if len(self._shadow) >= SHADOW_BUFFER:
            self._flush_shadow()

    def shadow_delete(self, table: str, key: str) -> None:
        self._shadow[(table, key)] = None
        if len(self._shadow) >= SHADOW_BUFFER:
            self._flush_shadow()

    def _flush_shadow(self) -> None:
        if not self._shadow:
            return
        self._begin()
        puts = [(t, k, shadow_text(v)) for (t, k), v in self._shadow.items() if v is not None]
        deletes = [(t, k) for (t, k), v in self._shadow.items() if v is None]
        if puts:
            self.conn.executemany(Q["put_shadow"], puts)
        if deletes:
            self.conn.executemany(Q["delete_shadow"], deletes)
        self._shadow.clear()

    # -- transaction boundaries ----------------------------------------------------------------

    def commit(self, slot: str | None, lsn: int = 0, *, wait: bool = True) -> int:
        """Make everything added so far durable together with the checkpoint ``lsn``
        (no checkpoint without a ``slot``: events appended through the API); the commit's
        number.  ``wait=False`` (capture's group commits): with the appender, the commit
        becomes durable on its thread after this returns (:attr:`commits_durable`)."""
        self._flush()
        self._settle()
        self._flush_shadow()
        if self._state is not None:
            self._state.flush()
        self._begin()
        if slot is not None:
            self.conn.execute(Q["set_checkpoint"], (slot, lsn, time.time()))
        self._commits += 1
        self.pending = 0
        self._in_txn = False
        if self._appender is not None and slot is not None and not wait:  # durable on the thread
            self._committing.append((self._appender.execute("COMMIT"), lsn))
            self._appending = True
            return self._commits
        self.conn.execute("COMMIT")
        self._commits_durable = self._commits
        if slot is not None:
            self._durable_lsn = lsn
        return self._commits

    def in_commit(self, write: Callable[[sqlite3.Connection], None]) -> None:
        """``write(conn)`` inside the current group commit: durable with the events and the
        checkpoint, or not at all (e.g. recording a skipped transaction)."""
        self._begin()
        write(self.conn)

    # -- what capture keeps about the source besides events (outbox/source_state.py) -------

    def pending_skips(self) -> set[int]:
        """Transactions an operator asked capture to skip, not yet skipped."""
        self._settle()
        return source_state.pending_skips(self.conn)

    def mark_skipped(self, xid: int, lsn: str, changes: int) -> None:
        """Record transaction ``xid`` as skipped in the current group commit: durable with
        the checkpoint that passes it, or not at all."""
        self.in_commit(lambda conn: source_state.mark_skipped(conn, xid, lsn, changes))

    @property
    def state(self) -> SqliteState:
        """Derived events' state (cart timers), written in the current group commit."""
        if self._state is None:
            self._state = SqliteState(self.conn, self._begin, self._before_read)
        return self._state

    def add_once(
        self, kind: str, key: str, event: tuple[Any, ...], newest: tuple[str, float] | None = None
    ) -> bool:
        """Append one event (the arguments of :meth:`add`) and commit it, unless the mark
        (``kind``, ``key``) is already in the outbox; the mark commits with the event.
        ``BEGIN IMMEDIATE`` serialises racing writers, in this process or another, so the
        event is appended once.  ``newest`` (a key of ``kind`` and a number) is raised to
        that number in the same commit, appended now or not.  Not inside a group commit:
        it makes its own."""
        if self.in_transaction:
            raise RuntimeError("add_once inside a group commit")
        self._begin()
        try:
            appended = self.state.state_get(kind, key) is None
            if appended:
                self.add(*event)
                self.state.state_put(kind, key, True, None, None)
            if newest is not None:
                name, value = newest
                current = self.state.state_get(kind, name)
                if current is None or value > current:
                    self.state.state_put(kind, name, value, None, None)
            self.commit(None)
        except BaseException:
            self.rollback()
            raise
        return appended

    # -- backfill jobs (outbox/backfills.py) ------------------------------------------------------

    def backfills(self) -> list[dict[str, Any]]:
        """Backfill jobs queued or running, oldest first."""
        self._before_read()
        return backfills.active(self.conn)

    def backfill_update(self, job: int, **progress: Any) -> None:
        """A job's progress, in the current group commit (with the chunk's events)."""
        self.in_commit(lambda conn: backfills.update(conn, job, **progress))

    def backfill_request(self, tables: list[str], reason: str, rate: float) -> None:
        """Queue a backfill of ``tables`` in the current group commit, cancelling any
        job still active."""

        def write(conn: sqlite3.Connection) -> None:
            backfills.stop_active(conn, "cancelled", f"replaced by a {reason} backfill")
            backfills.add(conn, tables, None, rate, reason)

        self.in_commit(write)

    def set_problems(self, problems: list[dict[str, Any]]) -> None:
        """Replace the stored mapping problems, in a write transaction of their own (so
        between group commits)."""
        self._settle()
        source_state.set_problems(self.conn, problems)

    def rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error, OutboxError):  # what failed is what is rolled back
            self._settle()
        self._events.clear()
        self._shadow.clear()
        if self._state is not None:
            self._state.forget()
        self.pending = 0
        self._in_txn = False
        if self.conn.in_transaction:  # (the thread is idle: SQLite's own word; a failed
            self.conn.execute("ROLLBACK")  # BEGIN opened none, a failed COMMIT may have)
        self.last_event_id = int(self.conn.execute(Q["last_event_id"]).fetchone()[0])

    def checkpoint(self, slot: str) -> int | None:
        self._settle()
        row = self.conn.execute(Q["get_checkpoint"], (slot,)).fetchone()
        if row is None:
            return None
        self._durable_lsn = max(self._durable_lsn, int(row[0]))
        return int(row[0])

    def close(self) -> None:
        """Close; a group commit still on the appender's thread is finished first, and
        raised if it failed (after everything is closed)."""
        try:
            self._settle()  # (before the rollback, which would say nothing of it)
            if self._in_txn:
                self.rollback()
        finally:
            if self._appender is not None:
                self._appender.close()  # before the connection: its statement is finalized
                self._appender = None
            if self.checkpointer is not None:
                self.checkpointer.stop()
            self.conn.close()

    @property
    def in_transaction(self) -> bool:
        """Whether anything was added since the last commit."""
        return (
            self._in_txn
            or bool(self._events)
            or bool(self._shadow)
            or bool(self._state and self._state.pending)
        )

    # -- internals -------------------------------------------------------------------------------

    def _begin(self) -> None:
        """Open the write transaction, once the queued events are in (a write of this
        connection's own follows)."""
        self._settle()
        self._open()

    def _open(self) -> None:
        if not self._in_txn:
            self.conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def _open_queued(self) -> None:
        """Open the write transaction behind what the appender holds (a group commit on
        its way), without waiting for it."""
        if not self._in_txn:
            assert self._appender is not None
            self._appender.execute("BEGIN IMMEDIATE")
            self._appending = True
            self._in_txn = True

    def _before_read(self) -> None:
        """Before a read of another table on this connection: no statement of the thread
        (a BEGIN waiting for another writer, a COMMIT's fsync) may hold the connection's
        mutex, which the read would wait for holding the GIL."""
        if self._appending:
            assert self._appender is not None
            self._appender.wait_statements()

    def _poll_commits(self) -> None:
        """Move what is durable past the group commits the appender has done; raise its
        error if it stopped on one."""
        assert self._appender is not None
        done = self._appender.done()
        while self._committing and self._committing[0][0] <= done:
            self._durable_lsn = self._committing.popleft()[1]
            self._commits_durable += 1
        if self._committing and self._appender.queued() == 0:
            self._settle()  # idle with a commit not done: it failed, and this raises

    def _settle(self) -> None:
        """Wait until what is queued on the appender is done; a failure is raised as an
        :class:`OutboxError` (sqlite3's message): the outbox's, never the change's at hand."""
        if self._appending:
            assert self._appender is not None
            self._appending = False
            try:
                last = settle(self._appender)
            except sqlite3.Error as exc:  # (an outbox error: never blamed on the change at hand)
                done = getattr(exc, "tickets_done", 0)
                while self._committing and self._committing[0][0] <= done:  # (done before it)
                    self._durable_lsn = self._committing.popleft()[1]
                    self._commits_durable += 1
                self._committing.clear()  # not durable, nor ever will be: their numbers
                self._commits = self._commits_durable  # are given again
                self._rows_queued = False
                raise OutboxError(f"capture's outbox writes failed: {exc}") from exc
            if self._rows_queued:  # (else the thread's last rowid is older than ours)
                self.last_event_id = last
                self._rows_queued = False
            while self._committing:  # every queued commit is done
                self._durable_lsn = self._committing.popleft()[1]
                self._commits_durable += 1

    def _flush(self) -> None:
        """Insert the buffered events, then their deliveries in one statement per endpoint."""
        if not self._events:
            return
        events, self._events = self._events, []
        for event_type, n in Counter(event[0] for event in events).items():
            EVENTS_APPENDED.labels(event_type).inc(n)
        kinds = {(event[0], event[10], event[11]) for event in events}
        if self._appender is not None and all(
            chosen is None and not routed and event_type in self._routed_types
            for event_type, routed, chosen in kinds
        ):  # events only (capture's): queued, inserted while capture goes on
            self._open_queued()
            try:
                self._appender.append(events)
            except (TypeError, OverflowError):  # a value it does not take: as before
                self._settle()
                self.conn.executemany(Q["insert_event"], events)
                self.last_event_id = int(self.conn.execute("SELECT last_insert_rowid()").fetchone()[0])
                return
            self._appending = self._rows_queued = True
            return
        self._begin()
        self.conn.executemany(Q["insert_event"], events)
        last = int(self.conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        first = last - len(events) + 1
        by_endpoint: dict[str, list[str]] = {}  # endpoint: the types it gets rows of now
        for event_type, routed, chosen in kinds:
            if chosen is not None:  # rows now, for the event's own endpoints
                for endpoint in set(loads(chosen)).intersection(self.router.names):
                    by_endpoint.setdefault(endpoint, [])
            elif routed:  # rows now, by type
                for endpoint in self.router.endpoints(event_type):
                    by_endpoint.setdefault(endpoint, []).append(event_type)
            elif event_type not in self._routed_types:  # a new type: its routes, in this commit
                self.conn.executemany(
                    Q["add_route"], [(endpoint, event_type) for endpoint in self.router.endpoints(event_type)]
                )
                self._routed_types.add(event_type)
        for endpoint, types in by_endpoint.items():
            self.conn.execute(
                Q["insert_deliveries"],
                {"endpoint": endpoint, "first": first, "last": last, "types": dumps(types)},
            )
        self.last_event_id = last


def shadow_text(values: dict[str, Any]) -> str:
    """A shadow row as stored: JSON, json/jsonb values as strings of their text."""
    json_columns = [c for c, v in values.items() if isinstance(v, JsonText)]
    if json_columns:
        values = {c: str.__str__(v) if isinstance(v, JsonText) else v for c, v in values.items()}
        values[SHADOW_JSON_COLUMNS] = json_columns
    return dumps(values)


def shadow_values(text: str) -> dict[str, Any]:
    """A stored shadow row back as the values capture compares (numbers exact)."""
    values: dict[str, Any] = loads(text)
    for column in values.pop(SHADOW_JSON_COLUMNS, ()):
        values[column] = JsonText(values[column])
    return values
