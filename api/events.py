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

from api.errors import ApiError
from api.models import EventsQuery, StreamQuery
from api.params import parse
from api.reads import Reads
from outbox import store

PAGE_TTL_SECONDS = 60.0  # how long a full page's answer is reused
POLL_SECONDS = 0.025  # how often another process's commits are looked for, while waited on
KEEPALIVE_SECONDS = 15.0  # an SSE comment line this often when nothing happens
STREAM_BATCH = 500
MAX_QUERIES = 10_000  # parsed parameter sets kept by query string
INLINE_ROWS = 100  # an unfiltered page up to this many events is read on the loop
RECHECK_SECONDS = 1.0  # how often a waiting request or an open stream checks its key again


Mark = tuple[asyncio.Event, int]


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
        return store.data_version(self._db())

    def mark(self) -> Mark:
        """Take before reading: :meth:`wait` then returns at once if anything was
        committed since, so no commit falls between a read and the wait."""
        self._loop = asyncio.get_running_loop()
        return self._changed, self._version()

    def changed_since(self, mark: Mark) -> bool:
        """Whether anything was committed after ``mark`` was taken."""
        return mark[0].is_set() or self._version() != mark[1]

    async def wait(self, mark: Mark, timeout: float) -> None:
        """Until something is committed after ``mark``, the server closes, or ``timeout``."""
        changed, version = mark
        if self.changed_since(mark) or self.closing.is_set():
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
    """The handlers.  Every outbox read whose cost a client can choose runs on
    :class:`Reads` threads, never on the loop: only an unfiltered page of at most
    :data:`INLINE_ROWS` events (a range of ids, a few dozen microseconds) is read on it;
    a waiting request checks its key again every :data:`RECHECK_SECONDS` (``recheck``
    raises the error a new request would get), so a revocation ends it."""

    def __init__(
        self,
        db: Callable[[], sqlite3.Connection],
        reads: Reads,
        feed: Feed,
        recheck: Callable[[web.Request], None],
    ) -> None:
        self.db = db
        self.reads = reads
        self.feed = feed
        self.recheck = recheck
        self.pages = PageCache()
        self.queries: dict[str, EventsQuery] = {}

    async def _read(self, after: int, types: list[str], limit: int, frame: Frame) -> tuple[bytes, int, int]:
        """The framed events after ``after`` (joined), where the read got to, and how many."""

        def read(conn: sqlite3.Connection) -> tuple[bytes, int, int]:
            rows, got_to = store.read_events(conn, after=after, types=types, limit=limit)
            return frame(rows), got_to, len(rows)

        if not types and limit <= INLINE_ROWS:
            return read(self.db())  # a read of a few rows by id: bounded, cheaper than a thread hop
        return await self.reads.run(read)

    async def events(self, request: web.Request) -> web.Response:
        q = self.queries.get(request.query_string)
        if q is None:  # readers repeat the same parameters: each set is validated once
            q = parse(EventsQuery, request)
            if len(self.queries) >= MAX_QUERIES:
                self.queries.clear()
            self.queries[request.query_string] = q
        after, limit, wait, types = q.last_event_id, q.limit, q.wait, q.types()
        key = (after, limit, *types)
        cached = self.pages.get(key)
        if cached is not None:
            return web.Response(body=cached, content_type="application/json")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            mark = self.feed.mark() if wait else None
            data, after, count = await self._read(after, types, limit, _json_rows)
            if count or mark is None or not await self._wait(request, mark, deadline):
                break  # with nothing found, meta.last_event_id still moves past what was read
        body = (
            b'{"success":true,"data":['
            + data
            + b'],"meta":'
            + orjson.dumps({"last_event_id": after, "count": count, "limit": limit})
            + b"}"
        )
        if count == limit:  # a full page: the same bytes whenever it is asked for again
            self.pages.put(key, body)
        return web.Response(body=body, content_type="application/json")

    async def _wait(self, request: web.Request, mark: Mark, deadline: float) -> bool:
        """Until a commit after ``mark`` (True) or ``deadline`` or shutdown (False),
        checking the caller's key every :data:`RECHECK_SECONDS` meanwhile."""
        loop = asyncio.get_running_loop()
        while not self.feed.closing.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self.recheck(request)
            await self.feed.wait(mark, min(remaining, RECHECK_SECONDS))
            if self.feed.changed_since(mark):
                return True
        return False

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
            try:
                await self._follow(request, response, after, types)
            except ApiError as exc:  # the key was revoked or changed: the stream ends
                await response.write(b"event: error\ndata: %s\n\n" % orjson.dumps(exc.body()))
        return response

    async def _follow(
        self, request: web.Request, response: web.StreamResponse, after: int, types: list[str]
    ) -> None:
        loop = asyncio.get_running_loop()
        written = loop.time()
        while not self.feed.closing.is_set():
            mark = self.feed.mark()
            data, after, count = await self._read(after, types, STREAM_BATCH, _sse_rows)
            if count:
                self.recheck(request)  # nothing more reaches a key revoked meanwhile
                await response.write(data)
                written = loop.time()
                if count == STREAM_BATCH:
                    continue
            while not self.feed.closing.is_set():
                await self.feed.wait(mark, RECHECK_SECONDS)
                if self.feed.changed_since(mark):
                    break
                self.recheck(request)
                if loop.time() - written >= KEEPALIVE_SECONDS:
                    await response.write(b": keep-alive\n\n")
                    written = loop.time()


Frame = Callable[[list[tuple[Any, ...]]], bytes]


def _json_rows(rows: list[tuple[Any, ...]]) -> bytes:
    return b",".join(store.envelope_json(r).encode() for r in rows)


def _sse_rows(rows: list[tuple[Any, ...]]) -> bytes:
    return b"".join(
        b"id: %d\nevent: %s\ndata: %s\n\n" % (r[0], r[1].encode(), store.envelope_json(r).encode())
        for r in rows
    )
