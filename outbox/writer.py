"""The outbox writer: one thread owns every capture write to SQLite.

A source transaction's events, their deliveries and the checkpoint LSN commit in one
SQLite transaction (WAL mode, synchronous=FULL); many small source transactions share one
commit.  Events go to SQLite in chunks inside that transaction, so a huge source
transaction never sits in memory.

The capture loop hands work over through a bounded queue and goes on reading the stream
while SQLite inserts and fsyncs; :attr:`OutboxWriter.durable_lsn` tells it what it may
confirm to Postgres.  Event ids are assigned here, inside ``BEGIN IMMEDIATE``, so another
appender (the API's manual events) can never take the same id.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from outbox.store import OutboxError, Q, Router, dumps

CHUNK = 1000
QUEUE_CHUNKS = 8  # at most this many chunks wait for SQLite: bounded memory

_Reply = queue.Queue[Any]


class OutboxWriter:
    """Single writer of the capture stage.

    Per group commit: :meth:`add` events of one or more source transactions, then
    :meth:`commit` with the end LSN of the last one.  :meth:`commit` returns at once;
    :attr:`durable_lsn` advances when the commit is on disk.  :meth:`rollback` forgets
    everything not yet committed.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        router: Router,
        *,
        on_durable: Callable[[int, int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.router = router
        self.on_durable = on_durable  # (lsn, last_event_id), called on the writer thread
        self.durable_lsn = 0
        self.last_event_id = 0
        self.pending = 0  # events added since the last commit request
        self._events: list[tuple[Any, ...]] = []
        self._dirty = False  # anything submitted or buffered since the last commit request
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._error: BaseException | None = None
        # writer-thread state
        self._in_txn = False
        self._thread = threading.Thread(target=self._loop, name="outbox-writer", daemon=True)
        self._thread.start()
        self._submit(("register", router.names))

    # -- capture-thread API --------------------------------------------------------------------

    def add(
        self,
        *,
        type: str,
        object: str,
        entity_id: Any,
        data: dict[str, Any],
        occurred_at: str,
        table: str | None,
        op: str | None,
        lsn: str | None,
        xid: int | None,
    ) -> None:
        """Buffer one event; its id and deliveries are assigned by the writer."""
        key = None if entity_id is None else str(entity_id)
        self._events.append((type, object, key, occurred_at, dumps(data), table, op, lsn, xid))
        self.pending += 1
        self._dirty = True
        if len(self._events) >= CHUNK:
            self._submit_events()

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        raw = self._call("shadow_get", table, key)
        return None if raw is None else dict(orjson.loads(raw))

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self._submit(("shadow_put", table, key, dumps(values)))

    def shadow_delete(self, table: str, key: str) -> None:
        self._submit(("shadow_delete", table, key))

    def commit(self, slot: str, lsn: int) -> None:
        """Request a commit of everything added so far with checkpoint ``lsn``."""
        self._submit(("commit", slot, lsn))
        self.pending = 0
        self._dirty = False

    def rollback(self) -> None:
        """Forget what is not committed; waits until the writer has done so."""
        self._events.clear()
        self.pending = 0
        self._dirty = False
        self._error = None
        self._call("rollback")

    def checkpoint(self, slot: str) -> int | None:
        value: int | None = self._call("checkpoint", slot)
        return value

    def sync(self) -> None:
        """Wait until everything submitted so far has been carried out."""
        self._call("sync")

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(("close",))
            self._thread.join()
        self.conn.close()

    @property
    def in_transaction(self) -> bool:
        """Whether work was added since the last commit request."""
        return self._dirty

    # -- plumbing -----------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OutboxError(f"outbox write failed: {self._error}") from self._error
        if not self._thread.is_alive():
            raise OutboxError("outbox writer is not running")

    def _submit_events(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self._submit(("events", events))

    def _submit(self, item: tuple[Any, ...]) -> None:
        self._raise_if_failed()
        if item[0] != "events":
            self._submit_events()  # keep the order of events and what follows them
            self._dirty = True
        while True:
            try:
                self._queue.put(item, timeout=1)
                return
            except queue.Full:
                self._raise_if_failed()

    def _call(self, op: str, *args: Any) -> Any:
        reply: _Reply = queue.Queue(maxsize=1)
        self._submit((op, *args, reply))
        while True:
            try:
                kind, value = reply.get(timeout=1)
            except queue.Empty:
                self._raise_if_failed()
                continue
            if kind == "error":
                raise OutboxError(f"outbox write failed: {value}") from value
            return value

    # -- writer thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            op = item[0]
            if op == "close":
                self._end_txn("ROLLBACK")
                return
            reply: _Reply | None = item[-1] if isinstance(item[-1], queue.Queue) else None
            try:
                if self._error is not None and op not in ("rollback", "sync"):
                    raise self._error
                value = self._apply(op, item[1:-1] if reply is not None else item[1:])
            except BaseException as exc:  # reported to the capture thread, never lost
                if self._error is None:
                    self._error = exc
                self._end_txn("ROLLBACK")
                if reply is not None:
                    reply.put(("error", exc))
                continue
            if reply is not None:
                reply.put(("ok", value))

    def _apply(self, op: str, args: tuple[Any, ...]) -> Any:
        conn = self.conn
        if op == "events":
            self._begin()
            self._insert(args[0])
        elif op == "shadow_get":
            self._begin()
            row = conn.execute(Q["get_shadow"], args).fetchone()
            return None if row is None else row[0]
        elif op == "shadow_put":
            self._begin()
            conn.execute(Q["put_shadow"], args)
        elif op == "shadow_delete":
            self._begin()
            conn.execute(Q["delete_shadow"], args)
        elif op == "commit":
            slot, lsn = args
            self._begin()
            conn.execute(Q["set_checkpoint"], (slot, lsn, time.time()))
            conn.execute("COMMIT")
            self._in_txn = False
            self.durable_lsn = lsn
            if self.on_durable is not None:
                self.on_durable(lsn, self.last_event_id)
        elif op == "rollback":
            self._error = None
            self._end_txn("ROLLBACK")
            self.last_event_id = int(conn.execute(Q["last_event_id"]).fetchone()[0])
        elif op == "register":
            now = time.time()
            conn.executemany(Q["register_endpoint"], [(name, now) for name in args[0]])
        elif op == "checkpoint":
            row = conn.execute(Q["get_checkpoint"], args).fetchone()
            if row is None:
                return None
            self.durable_lsn = max(self.durable_lsn, int(row[0]))
            return int(row[0])
        elif op != "sync":
            raise OutboxError(f"unknown writer operation {op!r}")
        return None

    def _begin(self) -> None:
        if not self._in_txn:
            self.conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True
            self._next_id = int(self.conn.execute(Q["last_event_id"]).fetchone()[0]) + 1

    def _end_txn(self, statement: str) -> None:
        if self._in_txn:
            try:
                self.conn.execute(statement)
            finally:
                self._in_txn = False

    def _insert(self, events: list[tuple[Any, ...]]) -> None:
        """Insert a chunk of events with fresh ids, then their deliveries per endpoint."""
        first = self._next_id
        now = time.time()
        rows = [(first + i, *event, now) for i, event in enumerate(events)]
        self._next_id += len(rows)
        self.conn.executemany(Q["insert_event"], rows)
        last = first + len(rows) - 1
        by_endpoint: dict[str, list[str]] = {}
        for event_type in {event[0] for event in events}:
            for endpoint in self.router.endpoints(event_type):
                by_endpoint.setdefault(endpoint, []).append(event_type)
        for endpoint, types in by_endpoint.items():
            self.conn.execute(
                Q["insert_deliveries"],
                {"endpoint": endpoint, "first": first, "last": last, "types": dumps(types)},
            )
        self.last_event_id = last
