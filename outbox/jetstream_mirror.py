"""A copy of the events stream in a local outbox file, for the API and dispatch roles on the
JetStream backend (docs/jetstream.md).

Each API or dispatch node follows the stream (an ordered consumer) and appends what it
reads to its own SQLite outbox, in order, each event under its stream sequence as id: the
``/events`` cursor, long-poll and SSE, ``evt_<id>`` webhook ids, the exports' hand-over
and every ``ct1-cdc outbox`` command then read the same ids on every node, through the
same code as the SQLite backend.  The copy is a cache: a node that loses its file reads
the stream again from the start.

Only the mirror appends events to the file: an id that is not the stream's sequence
stops it with one line, rather than serve events under ids another node does not give.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from common.errors import Ct1Error
from common.jsontext import loads
from outbox import jetstream_health as health
from outbox import jetstream_sends as sends
from outbox import store
from outbox.jetstream import JetStreamLog, Stored
from outbox.jetstream_leases import LEAVE_WITHIN, Leases
from outbox.jetstream_shared import ENDPOINTS, KEYS, SharedDeliveries
from outbox.store import Q, Router
from outbox.writer import OutboxWriter

log = structlog.get_logger("ct1_cdc.jetstream")

STATES_SECONDS = 1.0  # how often a dispatch node shares the endpoint states it changed
MARK = "jetstream_mirror"  # the copy's own kind in derived_state: which stream it copies


class MirrorError(Ct1Error):
    """The local copy no longer matches the stream."""


class Mirror:
    """Follows ``log`` into the outbox file on ``conn`` (whose writer it is), calling
    ``on_commit`` after each batch; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        log: JetStreamLog,
        conn: Callable[[], sqlite3.Connection],
        router: Router,
        on_commit: Callable[[], None] | None = None,
        leases: Leases | None = None,
    ) -> None:
        """``leases``: this node dispatches, sharing the partitions and their progress with
        the other dispatch nodes (outbox/jetstream_leases.py); the endpoint states its
        dispatcher changes are shared too (:meth:`_share_states`), and the rewinds of
        ``outbox replay --from`` are applied to the file (outbox/jetstream_rewinds.py)."""
        self.log = log
        self.connect = conn
        self.router = router
        self.on_commit = on_commit
        self.leases = leases
        self._leasing: threading.Thread | None = None
        self._leasing_failed: asyncio.Future[None]  # (made with the copy's event loop)
        self._loop: asyncio.AbstractEventLoop
        self.last_id = 0
        self.deliveries = SharedDeliveries()  # dead deliveries and replays, for every node
        self._states_shared: dict[str, dict[str, Any]] = {}  # endpoint states the bucket gave
        self._states_put: dict[str, float] = {}  # and those this node put (name: updated_at)
        self.caught_up = threading.Event()  # the copy reached the stream's end once
        # the file is checked, and its cursors moved to the shared progress: a dispatcher
        # may start (before, it would read cursors about to move)
        self.ready = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Follow the stream until ``stop`` is set (on this thread: its own event loop)."""
        writer = OutboxWriter(self.connect(), self.router)
        self._stop = stop
        try:
            asyncio.run(self._until_stopped(writer, stop))
        except Ct1Error:
            raise
        except Exception as exc:  # a client error the log did not name: one line still
            raise MirrorError(f"following stream {self.log.stream}: {type(exc).__name__}: {exc}") from exc
        finally:
            writer.close()

    async def _until_stopped(self, writer: OutboxWriter, stop: threading.Event) -> None:
        """:meth:`_follow`, given up at once when ``stop`` is set (connecting included)."""
        self._loop = asyncio.get_running_loop()
        self._leasing_failed = self._loop.create_future()  # (set from the leases' thread)
        follow = asyncio.ensure_future(self._follow(writer))
        stopped = asyncio.ensure_future(_until(stop))
        try:
            done, _ = await asyncio.wait(
                [follow, stopped, self._leasing_failed], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (follow, stopped):
                task.cancel()
                with contextlib.suppress(BaseException):  # (its error is read below)
                    await task
            if self._leasing is not None:  # it lets its partitions go once dispatch finished
                await asyncio.to_thread(self._leasing.join, LEAVE_WITHIN + 5)
                with contextlib.suppress(Exception):  # what the dispatcher settled last
                    await self._share_once(writer)
            with contextlib.suppress(Exception):
                await self.log.close()
        if self._leasing_failed.done():  # (or while the leases were let go, above)
            self._leasing_failed.result()  # (the leases' error: the node stops with it)
        if follow in done:
            follow.result()

    async def _follow(self, writer: OutboxWriter) -> None:
        writer.rollback()  # (reads the file's last event id)
        self.last_id = writer.last_event_id
        await self.log.connect()
        await self.log.ensure_stream()
        _, end = await self.log.bounds()
        await self._check_copy(writer, end)
        if self.last_id >= end:
            self.caught_up.set()
        synced = [asyncio.Event(), asyncio.Event()]  # keys, endpoint states
        followers = [
            asyncio.ensure_future(KEYS.follow(self.log, writer.conn, synced=synced[0])),
            asyncio.ensure_future(ENDPOINTS.follow(self.log, writer.conn, self._states_shared, synced[1])),
            asyncio.ensure_future(self.deliveries.follow(self.log, writer.conn)),
        ]
        sharing = None
        if self.leases is not None:  # (its own thread; it waits for the dispatcher to start)
            sharing = asyncio.ensure_future(self._share_states(writer))
            if self.leases.rewinds is not None:
                followers.append(asyncio.ensure_future(self.leases.rewinds.follow(self.log)))
            self._leasing = threading.Thread(target=self._lease, name="leases", daemon=True)
            self._leasing.start()
        # ready (the node says it started) once the keys and endpoint states made before
        # it started are in its file: no valid key refused, no disabled endpoint sent to
        while not all(event.is_set() for event in synced):
            for follower in followers:
                if follower.done():
                    follower.result()  # (it ended: its error)
            await asyncio.sleep(0.005)
        self.ready.set()
        log.info("mirror_started", stream=self.log.stream, after=self.last_id, stream_end=end)
        try:
            async for batch in self.log.follow(self.last_id):
                self._append(writer, batch)
                self.deliveries.caught_up(writer.conn)
                if not self.caught_up.is_set() and self.last_id >= end:
                    self.caught_up.set()
                    log.info("mirror_caught_up", stream=self.log.stream, last_event_id=self.last_id)
                for task in (sharing, *followers):
                    if task is not None and task.done():
                        task.result()  # (it ended: its error)
        finally:
            for task in (sharing, *followers):
                if task is not None:
                    task.cancel()

    def _lease(self) -> None:
        assert self.leases is not None
        try:
            self.leases.run_thread(self._stop)
        except BaseException as exc:  # the copy stops the node with it, at once
            with contextlib.suppress(RuntimeError):  # (unless it has ended: its loop is closed)
                self._loop.call_soon_threadsafe(_fail, self._leasing_failed, exc)

    # -- endpoint states, shared by the dispatch nodes ------------------------------------------

    async def _share_states(self, writer: OutboxWriter) -> None:
        """Every second, the endpoint states this node's dispatcher changed (a pause, a 410)
        and the deliveries it gave up on or delivered after a replay, for every node."""
        # what the file holds now was shared by whoever wrote it (or is the default of an
        # endpoint just registered, which must not outrank a state written elsewhere)
        self._states_put = {r["name"]: r["updated_at"] for r in ENDPOINTS.rows(writer.conn)}
        reporter = writer.state.state_get(MARK, "reporter")  # (this file's: a restart reports over it)
        if reporter is None:
            reporter = os.urandom(8).hex()
            writer.state.state_put(MARK, "reporter", reporter, None, None)
            writer.commit(None)
        next_report = 0.0
        while True:
            await self._share_once(writer)
            if self.leases is not None and time.monotonic() >= next_report:  # for the API nodes
                rows = store.endpoint_status(writer.conn, self.router.names, time.time())
                await health.report(self.log, str(reporter), rows)
                next_report = time.monotonic() + health.EVERY
            await asyncio.sleep(STATES_SECONDS)

    async def _share_once(self, writer: OutboxWriter) -> None:
        """One round: only states newer than what this node put and what the bucket gave
        (a row the follow applied is not put back: an echo could land over a newer one)."""
        changed = [
            r
            for r in ENDPOINTS.rows(writer.conn)
            if r["updated_at"] > max(self._states_put.get(r["name"], 0.0), self._shared_state_at(r["name"]))
        ]
        if changed:
            await ENDPOINTS.publish(self.log, changed)
            self._states_put.update((r["name"], r["updated_at"]) for r in changed)
        await self.deliveries.publish(self.log, writer.conn)

    def _shared_state_at(self, name: str) -> float:
        row = self._states_shared.get(name)
        return float(row["updated_at"]) if row is not None else 0.0

    async def _check_copy(self, writer: OutboxWriter, end: int) -> None:
        """The file must be a copy of this stream, up to an event the stream holds alike:
        an outbox of the SQLite backend, another stream's copy, a file something else
        appended to, would serve events under ids the other nodes do not give."""
        stream = self.log.stream
        mark = writer.state.state_get(MARK, "stream")
        if mark is None and self.last_id:
            raise MirrorError(
                f"the outbox holds {self.last_id} events that are not a copy of stream {stream}"
                " (an outbox of the SQLite backend?): give this node an outbox.path of its own"
            )
        if mark is not None and mark != self.log.created:
            raise MirrorError(
                f"the outbox is a copy of another stream {stream} (made {mark}, this one"
                f" {self.log.created}): give this node an outbox.path of its own"
            )
        if self.last_id > end:
            raise MirrorError(
                f"the outbox holds events up to {self.last_id} but stream {stream} ends at {end}:"
                " give this node an outbox.path of its own"
            )
        if self.last_id:
            row = writer.conn.execute(
                "SELECT type, entity_key, lsn, xid FROM events WHERE id = ?", (self.last_id,)
            ).fetchone()
            event = loads((await self.log.get(self.last_id)).body)
            expected = (event["type"], event.get("entity_key"), event.get("lsn"), event.get("xid"))
            if row is None or tuple(row) != expected:
                raise MirrorError(
                    f"event {self.last_id} of the outbox is not message {self.last_id} of stream {stream}:"
                    " something else appended events to it; give this node an outbox.path of its own"
                )
        if mark is None:
            writer.state.state_put(MARK, "stream", self.log.created, None, None)
            writer.commit(None)

    def _append(self, writer: OutboxWriter, batch: list[Stored]) -> None:
        (counter,) = writer.conn.execute(Q["last_event_id"]).fetchone()
        if counter != self.last_id:  # (checked before anything is written)
            raise MirrorError(
                f"the outbox's last event id is {counter}, not {self.last_id}: something else appended"
                " events to it; give this node an outbox.path of its own"
            )
        sent: list[tuple[str, int]] = []
        for stored in batch:
            event: dict[str, Any] = loads(stored.body)
            writer.add(
                event["type"],
                event["object"],
                event.get("entity_key"),
                event["data"],
                event["occurred_at"],
                event.get("source_table"),
                event.get("op"),
                event.get("lsn"),
                event.get("xid"),
                None,
                event.get("endpoints"),  # (a manual event narrowed by systems: its rows now)
            )
            request = sends.request_of(event.get("name"))
            if request is not None:
                sent.append((request, stored.seq))
        if sent:
            sends.record(writer, sent)
        writer.commit(None)
        if writer.last_event_id != batch[-1].seq:
            raise MirrorError(
                f"the local outbox gave id {writer.last_event_id} to stream message {batch[-1].seq}:"
                " something else appended events to it; give this node an outbox.path of its own"
            )
        self.last_id = batch[-1].seq
        if self.on_commit is not None:
            self.on_commit()


async def _until(stop: threading.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(0.1)


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
