"""Per-key rate limits (token buckets) and usage counters.

Both live in memory on the request path; counters go to the outbox (``api_usage`` and
``api_keys.last_used_at``) every :data:`FLUSH_SECONDS` and at shutdown, off the loop.
Limits are per process: a key may make ``rate_per_minute`` requests a minute with bursts
of ``burst``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from api.keys import K
from outbox import store

log = structlog.get_logger("ct1_cdc.api")

FLUSH_SECONDS = 5.0
MAX_BUCKETS = 100_000  # past this many keys or addresses, every bucket starts full again


@dataclass
class Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """``allow(key)`` returns 0 when the request may proceed, else the seconds to wait."""

    rate_per_minute: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def allow(self, key: str) -> int:
        if self.rate_per_minute <= 0:
            return 0  # limits off
        now = self.clock()
        rate = self.rate_per_minute / 60.0
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:  # e.g. failures from many addresses
                self.buckets.clear()
            bucket = self.buckets[key] = Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / rate))


class Usage:
    """Requests per (key, route), kept in memory and flushed to the outbox."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: dict[tuple[str, str], list[float]] = {}  # (key, route) -> [count, last]
        self._task: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._writing = asyncio.Lock()  # one flush at a time uses the connection

    def count(self, key_id: str, route: str) -> None:
        entry = self.pending.get((key_id, route))
        now = time.time()
        if entry is None:
            self.pending[(key_id, route)] = [1, now]
        else:
            entry[0] += 1
            entry[1] = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, {}
        rows = [(k, r, int(n), last) for (k, r), (n, last) in batch.items()]
        try:
            async with self._writing:
                await asyncio.to_thread(self._write, store.dumps(rows))
        except Exception as exc:  # counters are best effort; requests are never refused for them
            log.warning("api_usage_not_saved", error=str(exc), entries=len(rows))

    def _write(self, batch: str) -> None:
        if self._conn is None:  # opened (and migrated) once, on the first flush
            self._conn = store.open_outbox(self.path)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(K["add_usage"], {"batch": batch})
            self._conn.execute(K["touch_keys"], {"batch": batch})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
