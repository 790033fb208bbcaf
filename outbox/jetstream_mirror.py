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
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import structlog

from common.errors import Ct1Error
from common.jsontext import loads
from outbox.jetstream import JetStreamLog, Stored
from outbox.store import Router
from outbox.writer import OutboxWriter

log = structlog.get_logger("ct1_cdc.jetstream")


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
    ) -> None:
        self.log = log
        self.connect = conn
        self.router = router
        self.on_commit = on_commit
        self.last_id = 0
        self.caught_up = threading.Event()  # the copy reached the stream's end once

    def run(self, stop: threading.Event) -> None:
        """Follow the stream until ``stop`` is set (on this thread: its own event loop)."""
        writer = OutboxWriter(self.connect(), self.router)
        try:
            asyncio.run(self._follow(writer, stop))
        finally:
            writer.close()

    async def _follow(self, writer: OutboxWriter, stop: threading.Event) -> None:
        writer.rollback()  # (reads the file's last event id)
        self.last_id = writer.last_event_id
        await self.log.connect()
        try:
            await self.log.ensure_stream()
            _, end = await self.log.bounds()
            if self.last_id > end:
                raise MirrorError(
                    f"the local outbox holds events up to {self.last_id} but stream {self.log.stream} ends at"
                    f" {end}: another stream's copy? give this node an outbox.path of its own"
                )
            if self.last_id >= end:
                self.caught_up.set()
            log.info("mirror_started", stream=self.log.stream, after=self.last_id, stream_end=end)
            consume = asyncio.ensure_future(self._consume(writer, end))
            stopped = asyncio.ensure_future(_until(stop))
            done, _ = await asyncio.wait([consume, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (consume, stopped):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if consume in done:
                consume.result()
        finally:
            await self.log.close()

    async def _consume(self, writer: OutboxWriter, end: int) -> None:
        async for batch in self.log.follow(self.last_id):
            self._append(writer, batch)
            if not self.caught_up.is_set() and self.last_id >= end:
                self.caught_up.set()
                log.info("mirror_caught_up", stream=self.log.stream, last_event_id=self.last_id)

    def _append(self, writer: OutboxWriter, batch: list[Stored]) -> None:
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
            )
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
