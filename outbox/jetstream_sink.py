"""Capture's sink on the JetStream backend: events and their checkpoint on the stream
(:mod:`outbox.jetstream`), capture's own state beside it in a local SQLite file.

* **Events** are appended to the stream, each with a key that a second reading of the
  same transaction gives again: ``<xid>:<n>`` (the n-th event of that transaction), or
  for an event derived from the stream's clock, its position, type and entity.  A group
  (capture's group commit) goes as one append whose last message carries the checkpoint;
  a huge transaction goes in chunks of :data:`CHUNK` as it is read, so memory stays
  bounded.
* **Capture's state** (the shadow of watched columns, derived events' timers, skips,
  mapping problems, backfill jobs) and a copy of the checkpoint commit in the local file
  right after each append.
* **Exactly once across a crash.**  At start the sink reads the stream's end.  Capture
  resumes from the local checkpoint, so the state is rebuilt from where it was
  committed; events the stream already holds past that point (a group appended just
  before the crash, a chunk of a transaction cut short) are passed over by their keys,
  and the stream's writer goes on right after them.  Without a local file (a new
  host), capture resumes after the stream's last checkpoint, with empty state.

What this does not do yet (docs/jetstream.md): a standby on another host with the
state, several dispatchers, API nodes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import quote

from common.jsontext import dumps
from outbox.jetstream import JetStreamLog
from outbox.state import SqliteState
from outbox.writer import OutboxWriter

CHUNK = 1000  # events of an open group sent before its commit (a huge transaction)
T = TypeVar("T")


class LoopThread:
    """An event loop on a thread of its own: the stream's client is asyncio, capture is not."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jetstream", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class JetStreamSink:
    """A :class:`cdc.ports.Sink`: ``log`` not yet connected, ``local`` the state's writer."""

    def __init__(self, log: JetStreamLog, local: OutboxWriter) -> None:
        self.log = log
        self.local = local
        self._loop = LoopThread()
        try:
            self._loop.run(log.connect())
            self._loop.run(log.ensure_stream())
            tail = self._loop.run(log.adopt())
        except BaseException:
            self._loop.run(log.close())
            self._loop.stop()
            raise
        self._stream_checkpoint = tail.checkpoint
        self._stream_origin = tail.origin
        self._skip = set(tail.after)  # keys the stream holds past its last checkpoint
        self.durable_lsn = 0
        self.last_event_id = tail.last_seq
        self.pending = 0
        self._events: list[tuple[str, bytes]] = []
        self._counts: dict[Any, int] = {}  # events keyed so far per transaction (since the commit)
        self._open = False  # a chunk of the current group is in the stream already

    # -- events ------------------------------------------------------------------------------

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
    ) -> None:
        key = self._key(type, entity_id, lsn, xid)
        if key in self._skip:  # in the stream already: read again after a crash
            self._skip.discard(key)  # (a key is never given twice: it names one event)
            return
        body = dumps(
            {
                "type": type,
                "object": object,
                "entity_key": None if entity_id is None else str(entity_id),
                "occurred_at": occurred_at,
                "data": data,
                "source_table": table,
                "op": op,
                "lsn": lsn,
                "xid": xid,
                "created_at": time.time(),
            }
        )
        self._events.append((key, body))
        self.pending += 1
        if len(self._events) >= 2 * CHUNK:  # (the group's last events wait for its commit)
            chunk, self._events = self._events[:CHUNK], self._events[CHUNK:]
            self._loop.run(self.log.append_whole(chunk, None))
            self.last_event_id = self.log.last_seq
            self._open = True

    def _key(self, type: str, entity_id: Any, lsn: str | None, xid: int | None) -> str:
        if xid is not None:
            n = self._counts.get(xid, 0)
            self._counts[xid] = n + 1
            return f"{xid}:{n}"
        base = quote(f"{lsn}:{type}:{entity_id}", safe=":/.")  # header text is ASCII
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return f"{base}:{n}"

    def _send(self, checkpoint: int | None, origin: str | None = None) -> None:
        events, self._events = self._events, []
        self._loop.run(self.log.append_whole(events, checkpoint, origin))
        self.last_event_id = self.log.last_seq

    def commit(self, slot: str | None, lsn: int = 0) -> None:
        if self._events:
            self._send(lsn if slot is not None else 0, slot)
        self._open = False
        self._counts.clear()
        # (the keys still to pass over stay: reading again may take several commits)
        self.local.commit(slot, lsn)
        self.pending = 0
        if slot is not None:
            self.durable_lsn = lsn
            self._stream_checkpoint, self._stream_origin = lsn, slot

    def rollback(self) -> None:
        """Forget what was not committed.  A chunk already in the stream stays there: the
        stream's end is read again, and its keys are passed over when read again."""
        self._events.clear()
        self._counts.clear()
        self.pending = 0
        self.local.rollback()
        if self._open or self.log.position_unknown:
            self._open = False
            # what this writer stored of the group (chunks, part of a failed append) is
            # passed over when read again; an end that is not its own fences it
            self._skip |= set(self._loop.run(self.log.resync()))
            self.last_event_id = self.log.last_seq

    def checkpoint(self, slot: str) -> int | None:
        """Where capture resumes: the local checkpoint (the state is committed there);
        without a local one, the stream's.  Events the stream holds past the local one
        are passed over when read again."""
        local = self.local.checkpoint(slot)
        stream = self._stream_checkpoint if self._stream_origin == slot else None
        if local is None:
            found = stream
        else:
            found = local
            if stream is not None and stream > local:
                self._skip |= set(self._loop.run(self.log.keys_after(local)))
        if found is not None:
            self.durable_lsn = max(self.durable_lsn, found)
        return found

    @property
    def in_transaction(self) -> bool:
        return bool(self._events) or self._open or self.local.in_transaction

    def close(self) -> None:
        try:
            self._loop.run(self.log.close())
        finally:
            self._loop.stop()
            self.local.close()

    # -- capture's state: the local file ------------------------------------------------------

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        return self.local.shadow_get(table, key)

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self.local.shadow_put(table, key, values)

    def shadow_delete(self, table: str, key: str) -> None:
        self.local.shadow_delete(table, key)

    def pending_skips(self) -> set[int]:
        return self.local.pending_skips()

    def mark_skipped(self, xid: int, lsn: str, changes: int) -> None:
        self.local.mark_skipped(xid, lsn, changes)

    @property
    def state(self) -> SqliteState:
        return self.local.state

    def backfills(self) -> list[dict[str, Any]]:
        return self.local.backfills()

    def backfill_update(self, job: int, **progress: Any) -> None:
        self.local.backfill_update(job, **progress)

    def backfill_request(self, tables: list[str], reason: str, rate: float) -> None:
        self.local.backfill_request(tables, reason, rate)

    def set_problems(self, problems: list[dict[str, Any]]) -> None:
        self.local.set_problems(problems)
