"""The events cursor over HTTP: ``GET /events`` (with long-poll) and ``GET /events/stream``
(Server-Sent Events).

Both read the outbox in id order, which is commit order.  A waiting request wakes as
soon as new events are committed: at once when capture runs in this process (it calls
:meth:`Feed.notify`), within :data:`POLL_SECONDS` when it runs in another (SQLite's
``data_version`` is polled while anyone waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from api.models import EventsQuery, StreamQuery
from api.params import parse
from outbox import store

PAGE_TTL_SECONDS = 60.0  # how long a full page's answer is reused
POLL_SECONDS = 0.025  # how often another process's commits are looked for, while waited on
KEEPALIVE_SECONDS = 15.0  # an SSE comment line this often when nothing happens
STREAM_BATCH = 500
SCAN_BUDGET = 10_000  # outbox rows one read may go through before it yields or answers


class Feed:
    """New-event notifications for waiting requests."""

    def __init__(self, db: Callable[[], sqlite3.Connection]) -> None:
        self._db = db
        self._changed = asyncio.Event()
        self._waiters = 0
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = asyncio.Event()

    def bind(self) -> None:
        """Remember the running loop, so :meth:`notify` works before the first wait."""
        self._loop = asyncio.get_running_loop()

    def notify(self) -> None:
        """Events were committed (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # the next wait waits for the next commit

    def _version(self) -> int:
        return int(self._db().execute("PRAGMA data_version").fetchone()[0])

    def mark(self) -> tuple[asyncio.Event, int]:
        """Take before reading: :meth:`wait` then returns at once if anything was
        committed since, so no commit falls between a read and the wait."""
        self._loop = asyncio.get_running_loop()
        return self._changed, self._version()

    async def wait(self, mark: tuple[asyncio.Event, int], timeout: float) -> None:
        """Until something is committed after ``mark``, the server closes, or ``timeout``."""
        changed, version = mark
        if changed.is_set() or self._version() != version or self.closing.is_set():
            return
        self._waiters += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(version))
        closing = asyncio.ensure_future(self.closing.wait())
        woke = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait([closing, woke], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters -= 1
            closing.cancel()
            woke.cancel()

    async def _poll(self, version: int) -> None:
        while self._waiters > 0 and not self.closing.is_set():
            await asyncio.sleep(POLL_SECONDS)
            now = self._version()
            if now != version:
                version = now
                self._wake()

    async def close(self) -> None:
        self.closing.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


class PageCache:
    """Answers of full pages, by (cursor, limit, types).  Events never change once
    committed and ids only grow, so a page that came back full is the same bytes every
    time it is asked for (CT2 and CT3 read the same pages).  Entries live
    :data:`PAGE_TTL_SECONDS` (pruning may remove old events) within a byte budget."""

    def __init__(self, budget: int = 64 << 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.clock = clock
        self.size = 0
        self.entries: OrderedDict[tuple[Any, ...], tuple[float, bytes]] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry[1]

    def put(self, key: tuple[Any, ...], body: bytes) -> None:
        if len(body) > self.budget // 8:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (self.clock() + PAGE_TTL_SECONDS, body)
        self.size += len(body)
        while self.size > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[Any, ...]) -> None:
        self.size -= len(self.entries.pop(key)[1])


class Events:
    def __init__(self, db: Callable[[], sqlite3.Connection], feed: Feed) -> None:
        self.db = db
        self.feed = feed
        self.pages = PageCache()

    async def events(self, request: web.Request) -> web.Response:
        q = parse(EventsQuery, request)
        after, limit, wait, types = q.last_event_id, q.limit, q.wait, q.types()
        key = (after, limit, *types)
        cached = self.pages.get(key)
        if cached is not None:
            return web.Response(body=cached, content_type="application/json")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            mark = self.feed.mark() if wait else None
            rows, scanned, more = store.scan_events(
                self.db(), after=after, types=types, limit=limit, max_scan=SCAN_BUDGET
            )
            remaining = deadline - loop.time()
            if rows or remaining <= 0 or self.feed.closing.is_set():
                break  # with nothing found, meta.last_event_id still moves past what was read
            after = scanned  # what did not match needs no second look
            if more:
                await asyncio.sleep(0)  # let other requests run between slices of a long scan
                continue
            assert mark is not None
            await self.feed.wait(mark, remaining)
        body = (
            b'{"success":true,"data":['
            + b",".join(store.envelope_json(r).encode() for r in rows)
            + b'],"meta":'
            + orjson.dumps({"last_event_id": scanned, "count": len(rows), "limit": limit})
            + b"}"
        )
        if len(rows) == limit:  # a full page: the same bytes whenever it is asked for again
            self.pages.put(key, body)
        return web.Response(body=body, content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        q = parse(StreamQuery, request)
        after, types = q.after, q.types()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")
        with contextlib.suppress(ConnectionError):  # the client went away: nothing to answer
            await self._follow(response, after, types)
        return response

    async def _follow(self, response: web.StreamResponse, after: int, types: list[str]) -> None:
        loop = asyncio.get_running_loop()
        while not self.feed.closing.is_set():
            mark = self.feed.mark()
            rows, scanned, more = store.scan_events(
                self.db(), after=after, types=types, limit=STREAM_BATCH, max_scan=SCAN_BUDGET
            )
            if rows:
                await response.write(b"".join(_sse(r) for r in rows))
            after = scanned
            if more:
                await asyncio.sleep(0)
            elif len(rows) < STREAM_BATCH:
                before = loop.time()
                await self.feed.wait(mark, KEEPALIVE_SECONDS)
                if loop.time() - before >= KEEPALIVE_SECONDS:
                    await response.write(b": keep-alive\n\n")


def _sse(row: tuple[Any, ...]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (row[0], row[1].encode(), store.envelope_json(row).encode())
