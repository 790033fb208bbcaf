"""Capture's sink on the JetStream backend: events on one stream, capture's state on a
second, so that whichever host runs capture next finds both there (:mod:`outbox.jetstream`).

* **Events** are appended to the events stream, each with a key that a second reading
  of the same transaction gives again: ``<xid>:<n>`` (the n-th event of that
  transaction), or for an event derived from the stream's clock, its position, type and
  entity.  A group (capture's group commit) goes as one append; a huge transaction goes
  in chunks of :data:`CHUNK` as it is read, so memory stays bounded.
* **Capture's state** (the shadow of watched columns, derived events' timers) goes to the
  state stream (``<stream>_STATE``) as the changes of each group, after the group's
  events: one message per group at least, the last of them carrying the group's
  checkpoint and how far the events stream reached.  The state stream is the resume
  point: capture reads again from its last checkpoint, and the events stored after the
  sequence that message names (a group whose state message was lost, chunks of a
  transaction cut short) are passed over by their keys.  Nothing is taken from the host:
  a standby on another machine resumes exactly where the writer before it stopped.
* **The local SQLite file** (``outbox.path``) holds a copy of the state to query (cart
  timers by due time, the shadow by key), brought up to date from the state stream at
  the start of every session (a standby does so at every attempt, so its copy stays
  warm), and what stays with the host: skip requests, mapping problems, backfill jobs
  (a job's progress also goes into the state stream with its chunk's events, under this
  host's name, so that a crash before the local commit does not read the chunk again).
* **The state stream stays small**: after enough groups, a snapshot of the whole state is
  appended and everything before it purged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import zlib
from collections.abc import Callable, Container, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import structlog
from nats.js.errors import NotFoundError

from common.jsontext import dumps, loads
from outbox import source_state
from outbox.jetstream import JetStreamError, JetStreamLog, Stored
from outbox.state import SqliteState
from outbox.writer import OutboxWriter, shadow_text, shadow_values

log = structlog.get_logger("ct1_cdc.jetstream")

CHUNK = 1000  # events of an open group sent before its commit (a huge transaction)
STATE_CHUNK = 2000  # state changes per message of the state stream
READ_BATCH = 200  # state messages read per request when bringing the local copy up to date
SNAPSHOT_MIN = 5000  # state messages in the stream before a snapshot is considered
META = "jetstream"  # the local copy's own kind in derived_state: which stream, how far
T = TypeVar("T")


def state_log(log: JetStreamLog) -> JetStreamLog:
    """The state stream beside an events stream: ``<stream>_STATE``, ``<subject>.state``."""
    return JetStreamLog(
        log.servers,
        stream=f"{log.stream}_STATE",
        subject=f"{log.subject}-state",  # (not under the events' subjects: they may be partitioned)
        replicas=log.replicas,
        timeout=log.timeout,
    )


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


SEND_PREFIX = "send:"  # a manual event's name, send:<request> (outbox/jetstream_sends.py)
SKIPS = "SKIPS"  # <stream>_SKIPS: `ct1-cdc slot skip` on any host, for whichever captures (outbox/jetstream_shared.py puts them)


async def skip_requests(events: JetStreamLog) -> list[tuple[int, float]]:
    """The transactions an operator asked to skip, on any host: (xid, when asked)."""
    bucket = await events.bucket(f"{events.stream}_{SKIPS}")
    asked = []
    for key in await events.keys(bucket):
        entry = await events.retrying(bucket.get, key)
        if entry.value:
            row = loads(entry.value)
            asked.append((int(row["xid"]), float(row["requested_at"])))
    return asked


class RecordedState:
    """The local copy's :class:`SqliteState`, each change also noted for the state stream."""

    def __init__(self, inner: SqliteState, changes: list[list[Any]], noted: Callable[[], None]) -> None:
        self.inner = inner
        self.changes = changes
        self.noted = noted

    def state_get(self, kind: str, key: str) -> Any | None:
        return self.inner.state_get(kind, key)

    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None:
        self.inner.state_put(kind, key, value, ref, due)
        self.changes.append(["k", kind, key, dumps(value).decode(), ref, due])
        self.noted()

    def state_delete(self, kind: str, key: str) -> None:
        self.inner.state_delete(kind, key)
        self.changes.append(["k", kind, key, None, None, None])
        self.noted()

    def state_by_ref(self, kind: str, ref: str) -> list[Any]:
        return self.inner.state_by_ref(kind, ref)

    def state_due(self, kind: str, until: float, limit: int) -> list[Any]:
        return self.inner.state_due(kind, until, limit)

    def state_next_due(self, kind: str) -> float | None:
        return self.inner.state_next_due(kind)

    def state_refs(self, kind: str, limit: int) -> set[str] | None:
        return self.inner.state_refs(kind, limit)

    def state_count(self, kind: str) -> tuple[int, int]:
        return self.inner.state_count(kind)


class JetStreamSink:
    """A :class:`cdc.ports.Sink`: ``log`` the events stream and ``states`` the state stream
    (not yet connected; by default :func:`state_log` of ``log``), ``local`` the writer of
    the local copy."""

    def __init__(self, log: JetStreamLog, local: OutboxWriter, states: JetStreamLog | None = None) -> None:
        self.log = log
        self.states = states or state_log(log)
        self.local = local
        self._loop = LoopThread()
        try:
            for each in (self.log, self.states):
                self._loop.run(each.connect())
                self._loop.run(each.ensure_stream())
        except BaseException:
            self._close_logs()
            raise
        self._writer = os.urandom(4).hex()  # the state messages' keys: this writer's own
        self._sent = 0
        self.durable_lsn = 0
        self.commits_durable = 0  # (each commit is durable when it returns)
        self.last_event_id = 0
        self.pending = 0
        self._events: list[tuple[str, bytes, int]] = []
        self._counts: dict[Any, int] = {}  # events keyed so far per transaction (since the commit)
        self._open = False  # a chunk of the current group is in the events stream already
        self._changes: list[list[Any]] = []  # state changes since the last commit, not yet sent
        self._state_open = False  # some of them are in the state stream already
        self._void = False  # the state stream ends with changes of a group never committed
        # keys the events stream holds past what the state's checkpoint covers (None: not
        # read yet), and the sequence up to which the checkpoint covers it
        self._skip: dict[str, int | None] | None = None  # key -> its stored group's checkpoint
        self._reread: set[str] = set()  # backfill chunks given again since the commit (by name)
        self._covered = 0
        self._checkpoint: int | None = None
        self._origin: str | None = None
        self._in_stream = 0  # state messages in the stream (since its last snapshot)
        self._state = RecordedState(local.state, self._changes, self._note)
        # the local copy is rebuilt from the state stream if lost: no fsync per commit
        local.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._host = self._host_id()
            self._sync()
        except BaseException:
            self._close_logs()
            raise

    # -- where capture resumes: read from the streams ---------------------------------------

    def _sync(self) -> None:
        """Read where the writer before stopped, from the streams alone: bring the local
        copy of the state up to the state stream's last checkpoint and take both streams'
        ends as this writer's (whoever wrote before is fenced once this one appends).  The
        events stored after what that checkpoint covers are read when the first event
        comes (:meth:`_pass_over`): a standby's tries stay cheap, and what the writer
        before appended until it died is among them."""
        for _ in range(5):
            try:
                self._sync_once()
                return
            except _ReadAgain as again:
                log.info("jetstream_state_read_again", reason=str(again))
        raise JetStreamError(f"stream {self.states.stream} kept changing while it was read (5 tries)")

    def _sync_once(self) -> None:
        self.local.rollback()
        end = self._loop.run(self.states.adopt())
        states = self._loop.run(self.states.tail())
        if states.last_seq != end:
            raise _ReadAgain("the state stream was appended to meanwhile")
        self._void = bool(states.after)  # a group's changes without its checkpoint: void
        first, last = self._loop.run(self.states.bounds())
        self._in_stream = last - first + 1
        self.last_event_id = self._loop.run(self.log.adopt())
        self._skip = None
        if states.checkpoint_seq == 0:  # no state yet: a new stream (or one from before it)
            if self._applied()[0] not in ("", self.states.created):
                self._reset_local()
            events = self._loop.run(self.log.tail())
            if events.checkpoint is not None:
                log.warning("jetstream_state_missing", stream=self.states.stream, resume=events.checkpoint)
            self._checkpoint, self._origin = events.checkpoint, events.origin
            self._covered = events.checkpoint_seq
            return
        applied_in, applied, applied_key = self._applied()
        if (
            applied_in != self.states.created
            or not first - 1 <= applied <= states.checkpoint_seq
            or (applied >= first and self._key_at(applied) != applied_key)
        ):
            self._reset_local()  # another stream, purged past the copy, another history
            applied = first - 1
        self._covered = self._fold(applied, states.checkpoint_seq)
        self._checkpoint, self._origin = states.checkpoint, states.origin

    def _key_at(self, seq: int) -> str | None:
        try:
            return self._loop.run(self.states.get(seq)).key
        except NotFoundError as exc:
            raise _ReadAgain(f"message {seq} purged meanwhile") from exc

    def _pass_over(self) -> dict[str, int | None]:
        """The keys of the events stored after what the resume checkpoint covers."""
        if self._skip is None:
            self._skip = dict(self._loop.run(self.log.keys_since(self._covered)))
        return self._skip

    def _applied(self) -> tuple[str, int, str | None]:
        """(the state stream, the sequence, its key) the local copy was brought up to."""
        found = self.local.state.state_get(META, "applied")
        if found is None or len(found) != 3:
            return "", 0, None
        return str(found[0]), int(found[1]), found[2]

    def _mark_applied(self, seq: int, key: str | None) -> None:
        self.local.state.state_put(META, "applied", [self.states.created, seq, key], None, None)

    def _host_id(self) -> str:
        """This host's capture file's own name, kept across restarts: a backfill job's
        progress in the state stream is this host's only under it (job ids are local)."""
        found = self.local.state.state_get(META, "host")
        if found is None:
            found = os.urandom(8).hex()
            self.local.state.state_put(META, "host", found, None, None)
            self.local.commit(None)
        return str(found)

    def _reset_local(self) -> None:
        def clear(conn: Any) -> None:
            conn.execute("DELETE FROM shadow")
            conn.execute("DELETE FROM derived_state WHERE NOT (kind = ? AND key = 'host')", (META,))
            conn.execute("DELETE FROM checkpoint")

        self.local.in_commit(clear)
        self.local.commit(None)

    def _fold(self, after: int, upto: int) -> int:
        """Apply the state stream's messages after ``after`` up to ``upto`` (a checkpoint's
        message) to the local copy, a group at a time; returns the events stream's
        sequence that the last checkpoint covers.  A purge under the read (the writer
        made a snapshot) makes the caller read again, from the snapshot."""
        events_end = 0
        while after < upto:
            try:
                batch = self._loop.run(self._read(self.states, after, min(upto, after + READ_BATCH)))
            except NotFoundError as exc:
                raise _ReadAgain(f"purged after {after}") from exc
            if not batch or batch[0].seq != after + 1:
                raise _ReadAgain(f"purged after {after}")
            for stored in batch:
                body = loads(stored.body)
                if body.get("void"):
                    self.local.rollback()  # the changes of a group never committed
                self._apply(body["ops"])
                if stored.commit is not None:
                    events_end = int(body["events"])
                    self._mark_applied(stored.seq, stored.key)
                    self.local.commit(stored.origin, stored.commit)
                after = stored.seq
        self.local.rollback()  # (nothing past the last checkpoint is state)
        if not events_end and upto:  # already up to date: the checkpoint's message says
            try:
                events_end = int(loads(self._loop.run(self.states.get(upto)).body)["events"])
            except NotFoundError as exc:
                raise _ReadAgain(f"message {upto} purged meanwhile") from exc
        return events_end

    @staticmethod
    async def _read(log: JetStreamLog, after: int, upto: int) -> list[Stored]:
        return [stored async for stored in log.scan(after, upto)]

    def _apply(self, ops: list[list[Any]]) -> None:
        for op in ops:
            if op[0] == "x":  # a transaction skipped (xids are the source's: every host's)
                _, xid, lsn, changes, at = op

                def skipped(
                    conn: Any, xid: int = xid, lsn: str = lsn, changes: int = changes, at: float = at
                ) -> None:
                    source_state.skipped_elsewhere(conn, xid, lsn, changes, at)

                self.local.in_commit(skipped)
            elif op[0] == "b":  # a backfill job's progress: this host's jobs only (ids are local)
                _, host, job, text = op
                if host == self._host:
                    self.local.backfill_update(job, **loads(text))
            elif op[0] == "s":
                _, table, key, text = op
                if text is None:
                    self.local.shadow_delete(table, key)
                else:
                    self.local.shadow_put(table, key, shadow_values(text))
            else:
                _, kind, key, text, ref, due = op
                if text is None:
                    self.local.state.state_delete(kind, key)
                else:
                    self.local.state.state_put(kind, key, loads(text), ref, due)

    def checkpoint(self, slot: str) -> int | None:
        """Where capture resumes: the state stream's last checkpoint (read again from the
        streams when nothing is uncommitted: a new session, or a standby's next try)."""
        if not self.in_transaction:
            self._sync()
        found = self._checkpoint if self._origin == slot else None
        if found is not None:
            self.durable_lsn = max(self.durable_lsn, found)
        return found

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
        name: str | None = None,
        endpoints: Sequence[str] | None = None,
    ) -> None:
        key = self._key(type, entity_id, lsn, xid, name)
        skip = self._skip if self._skip is not None else self._pass_over()
        if key in skip:  # in the stream already: read again after a crash
            del skip[key]  # (a key is never given twice: it names one event)
            if name is not None:
                self._reread.add(name)
            return
        event: dict[str, Any] = {
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
        if endpoints is not None:  # (every node's copy makes its rows for these alone)
            event["endpoints"] = sorted(endpoints)
        if name is not None and name.startswith(SEND_PREFIX):  # (the asking API node waits for it)
            event["name"] = name
        body = dumps(event)
        self._events.append((key, body, self._partition(object, entity_id)))
        self.pending += 1
        if len(self._events) >= 2 * CHUNK:  # (the group's last events wait for its commit)
            chunk, self._events = self._events[:CHUNK], self._events[CHUNK:]
            self._loop.run(self.log.append_whole(chunk, None))
            self.last_event_id = self.log.last_seq
            self._open = True

    def _partition(self, object: str, entity_id: Any) -> int:
        """The partition of an entity: its events go to one subject, so that the dispatcher
        holding that partition delivers them in order."""
        if not self.log.partitions:
            return 0
        entity = f"{object}:{'' if entity_id is None else entity_id}"
        return zlib.crc32(entity.encode()) % self.log.partitions

    def _key(self, type: str, entity_id: Any, lsn: str | None, xid: int | None, name: str | None) -> str:
        """An event's key in the stream (its message id): the same when the event is made
        again after a crash, so that it is passed over, and never another event's."""
        if xid is not None:
            n = self._counts.get(xid, 0)
            self._counts[xid] = n + 1
            return f"{xid}:{n}"
        # a backfill chunk's rows by their job and chunk (a chunk read again after a crash
        # comes back under another watermark); other events by their position
        base = quote(f"{name}:{type}:{entity_id}" if name else f"{lsn}:{type}:{entity_id}", safe=":/.")
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return f"{base}:{n}"

    def _send(self, checkpoint: int | None, origin: str | None = None) -> None:
        events, self._events = self._events, []
        self._loop.run(self.log.append_whole(events, checkpoint, origin))
        self.last_event_id = self.log.last_seq

    def _state_message(self, final: bool) -> tuple[str, bytes]:
        body: dict[str, Any] = {"ops": list(self._changes)}
        self._changes.clear()
        if self._void:
            body["void"] = True  # what the stream holds past the last checkpoint is not state
            self._void = False
        if final:
            # what the checkpoint covers: the events stream's end, unless events stored
            # after the resume point are still to be read again (a second cut meanwhile
            # must pass over them too)
            if self._skip is not None and not self._skip:
                self._covered = self.log.last_seq
            body["events"] = self._covered
        self._sent += 1
        return f"{self._writer}.{self._sent}", dumps(body)

    def _note(self) -> None:
        """A change was noted: a huge group's changes go to the state stream in chunks."""
        if len(self._changes) >= STATE_CHUNK:
            self._loop.run(self.states.append_whole([self._state_message(False)], None))
            self._state_open = True
            self._in_stream += 1

    def commit(self, slot: str | None, lsn: int = 0, *, wait: bool = True) -> int:
        checkpoint, origin = (lsn, slot) if slot is not None else (self._checkpoint or 0, self._origin)
        # (events appended without a position leave the checkpoint as it was)
        if self._skip:
            self._pass_no_longer(slot, lsn)
        sent = bool(self._events) or self._open
        if self._events:
            self._send(lsn if slot is not None else 0, slot)
        if slot is not None or sent or self._changes or self._state_open:
            self._loop.run(self.states.append_whole([self._state_message(True)], checkpoint, origin))
            self._in_stream += 1
            self._mark_applied(self.states.last_seq, self.states.last_key)
        self._open = self._state_open = False
        self._counts.clear()
        # (the keys still to pass over stay: reading again may take several commits)
        self.local.commit(slot, lsn)
        self.pending = 0
        self._checkpoint, self._origin = checkpoint, origin
        if slot is not None:
            self.durable_lsn = lsn
        if self._in_stream >= SNAPSHOT_MIN:
            self._snapshot()
        self.commits_durable += 1
        return self.commits_durable

    def _pass_no_longer(self, slot: str | None, lsn: int) -> None:
        """Keys no longer waited for.  A stored group this checkpoint has passed will not be
        read again: what of it did not come back (a transaction skipped since, a mapping
        changed) never will.  A backfill chunk's rows come back wherever the chunk is read
        again, past any checkpoint: those of a chunk given again, or of a job that ended,
        are no longer waited for.  A manual event comes back whenever its request is served
        again, past any checkpoint too: it is waited for until then, or until its request
        is gone (:meth:`sends_gone`)."""
        assert self._skip is not None
        done: list[str] = []
        if slot is not None:
            done += [
                k
                for k, at in self._skip.items()
                if at is not None and at <= lsn and not k.startswith(("bf", SEND_PREFIX))
            ]
        prefixes = [quote(f"{name}:", safe=":/.") for name in self._reread]
        for op in self._changes:
            if op[0] == "b" and loads(op[3]).get("state") in ("done", "cancelled", "failed"):
                prefixes.append(f"bf{op[2]}:")
        if prefixes:
            done += [k for k in self._skip if k.startswith(tuple(prefixes))]
        for key in done:
            self._skip.pop(key, None)
        self._reread.clear()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro`` on the streams' event loop (capture's thread waits for it)."""
        return self._loop.run(coro)

    def sends_gone(self, asked: Container[str]) -> None:
        """Manual events stored before a crash, waited for to be passed over when asked
        again, whose request (an id in ``asked``) is no longer in the cluster: they will not
        be asked again, so they no longer hold back what the checkpoint covers."""
        skip = self._skip if self._skip is not None else self._pass_over()
        for key in [k for k in skip if k.startswith(SEND_PREFIX)]:
            if key.split(":")[1] not in asked:
                del skip[key]

    def rollback(self) -> None:
        """Forget what was not committed.  What a stream holds of it (chunks of a huge
        transaction, part of a failed append) stays there: both ends are read again, the
        events passed over by their keys when read again, the state changes void."""
        self._events.clear()
        self._counts.clear()
        self._changes.clear()
        self._reread.clear()
        self.pending = 0
        self.local.rollback()
        touched = False
        for stream, open_ in ((self.log, self._open), (self.states, self._state_open)):
            if (open_ or stream.position_unknown) and not stream.fresh:
                self._loop.run(stream.resync())  # an end that is not this writer's fences it
                touched = True
        self._open = self._state_open = False
        if touched:
            self._sync()

    # -- the state stream's snapshot -----------------------------------------------------------

    def _snapshot(self) -> None:
        """Append the whole state, then purge what came before it, once the stream holds
        at least twice as many messages as a snapshot takes (so it costs a constant share
        of the appends)."""
        conn = self.local.conn
        (rows,) = conn.execute(
            "SELECT (SELECT count(*) FROM shadow) + (SELECT count(*) FROM derived_state WHERE kind != ?)",
            (META,),
        ).fetchone()
        if self._in_stream < max(SNAPSHOT_MIN, 2 * (int(rows) // STATE_CHUNK + 1)):
            return
        start = self.states.last_seq + 1
        shadow = (["s", *row] for row in conn.execute("SELECT tbl, key, vals FROM shadow"))
        state = (
            ["k", *row]
            for row in conn.execute(
                "SELECT kind, key, value, ref, due FROM derived_state WHERE kind != ?", (META,)
            )
        )
        messages: list[tuple[str, bytes]] = []
        count = 0
        for op in itertools.chain(shadow, state):
            self._changes.append(op)
            if len(self._changes) >= STATE_CHUNK:
                messages.append(self._state_message(False))
            if len(messages) >= 100:  # (memory stays bounded, however large the state)
                self._loop.run(self.states.append_whole(messages, None))
                count, messages = count + len(messages), []
        messages.append(self._state_message(True))
        self._loop.run(self.states.append_whole(messages, self._checkpoint or 0, self._origin))
        self._loop.run(self.states.purge_before(start))
        self._in_stream = count + len(messages)
        self._mark_applied(self.states.last_seq, self.states.last_key)
        self.local.commit(None)
        log.info("jetstream_state_snapshot", stream=self.states.stream, rows=rows, messages=self._in_stream)

    @property
    def in_transaction(self) -> bool:
        return (
            bool(self._events)
            or self._open
            or bool(self._changes)
            or self._state_open
            or self.local.in_transaction
        )

    def close(self) -> None:
        try:
            self._close_logs()
        finally:
            self.local.close()

    def _close_logs(self) -> None:
        try:
            for each in (self.log, self.states):
                self._loop.run(each.close())
        finally:
            self._loop.stop()

    # -- capture's state: noted for the state stream, kept in the local copy --------------------

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        return self.local.shadow_get(table, key)

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self.local.shadow_put(table, key, values)
        self._changes.append(["s", table, key, shadow_text(values)])
        self._note()

    def shadow_delete(self, table: str, key: str) -> None:
        self.local.shadow_delete(table, key)
        self._changes.append(["s", table, key, None])
        self._note()

    @property
    def state(self) -> RecordedState:
        return self._state

    # -- what stays with the host: the local file ------------------------------------------------

    def pending_skips(self) -> set[int]:
        """What an operator asked to skip on any host (`slot skip` puts it in the cluster
        too), less what a capture skipped (in the state stream: a standby knows it)."""
        asked = self._loop.run(skip_requests(self.log))
        if asked:
            for xid, at in asked:
                source_state.request_skip(self.local.conn, xid, at)
        return self.local.pending_skips()

    def mark_skipped(self, xid: int, lsn: str, changes: int) -> None:
        self.local.mark_skipped(xid, lsn, changes)
        self._changes.append(["x", xid, lsn, changes, time.time()])
        self._note()

    def backfills(self) -> list[dict[str, Any]]:
        return self.local.backfills()

    def backfill_update(self, job: int, **progress: Any) -> None:
        """A job's progress, in the group with its chunk's events: in the state stream too,
        so a crash before the local file committed the group does not read the chunk again
        (its rows would go into the stream twice, under a new watermark's keys)."""
        self.local.backfill_update(job, **progress)
        self._changes.append(["b", self._host, job, dumps(progress).decode()])
        self._note()

    def backfill_request(self, tables: list[str], reason: str, rate: float) -> None:
        self.local.backfill_request(tables, reason, rate)

    def set_problems(self, problems: list[dict[str, Any]]) -> None:
        self.local.set_problems(problems)


class _ReadAgain(Exception):
    """The state stream changed under a read (a purge, an append): read it again."""
