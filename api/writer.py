"""The API process's one outbox writer.

Manual events (``POST /webhooks/send``), the usage counters and the ``/readyz`` write
check all go through one :class:`outbox.writer.OutboxWriter`, used only on a thread of
its own: writes are serialised, the event loop never waits on the disk, and the process
holds one SQLite write connection.  The app opens it when it starts and closes it at
cleanup.  When the outbox cannot be written the caller gets the error, the writer is
dropped (rolling back), and the next write opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from config.settings import Settings
from outbox import keys, store
from outbox.store import Router, routes_of
from outbox.writer import OutboxWriter

log = structlog.get_logger("ct1_cdc.api")
T = TypeVar("T")


class ApiWriter:
    def __init__(self, settings: Settings) -> None:
        self.path = settings.outbox.path
        # the routing of captured events (sidecar.runner.router_for): enabled endpoints, their globs
        self.routes = routes_of(settings.endpoints)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="api-write")
        self._writer: OutboxWriter | None = None

    async def _run(self, fn: Callable[[OutboxWriter], T], *, writes: bool = True) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._with_writer, fn, writes)

    def _with_writer(self, fn: Callable[[OutboxWriter], T], writes: bool) -> T:
        if self._writer is None:  # opened (created, migrated) once, and again after a failure
            conn = store.open_outbox(self.path)
            try:
                self._writer = OutboxWriter(conn, Router(self.routes), rows_at_append=True)
            except BaseException:
                conn.close()
                raise
        try:
            return fn(self._writer)
        except BaseException:
            if writes:
                self._drop()  # rolls back what was not committed
            raise

    def _drop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(sqlite3.Error):
                writer.close()

    async def open(self) -> None:
        """Open the outbox for writing now; when it cannot be, say so and let the first
        write try again."""
        try:
            await self._run(lambda _: None, writes=False)
        except (sqlite3.Error, store.OutboxError) as exc:
            log.warning("api_outbox_not_writable", error=str(exc))

    async def append(
        self, event_type: str, data: dict[str, Any], names: Sequence[str], occurred_at: str
    ) -> int:
        """Append one manual event delivered to the endpoints ``names`` and commit; its id."""

        def append(writer: OutboxWriter) -> int:
            writer.add(event_type, "manual", None, data, occurred_at, None, "manual", None, None, None, names)
            writer.commit(None)
            return writer.last_event_id

        return await self._run(append)

    async def record_usage(self, rows: Sequence[tuple[str, str, int, float]]) -> None:
        """Add usage counts ``(key_id, route, requests, last_used_at)`` and commit."""

        def record(writer: OutboxWriter) -> None:
            writer.in_commit(lambda conn: keys.record_usage(conn, rows))
            writer.commit(None)

        await self._run(record)

    async def check(self) -> dict[str, Any]:
        """``{"ok": true}`` when the outbox takes a write now, else the error."""
        try:
            await self._run(lambda writer: store.check_writable(writer.conn), writes=False)
        except Exception as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)
        self._thread.shutdown(wait=True)
