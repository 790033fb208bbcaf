"""Per-key rate limits (token buckets) and usage counters.

Both live in memory on the request path; counters go to the outbox (usage per key and
route, each key's last use) every :data:`FLUSH_SECONDS` and at shutdown, through the
API's writer, off the loop.
Limits are per process: a key may make ``rate_per_minute`` requests a minute with bursts
of ``burst``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

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
    """Requests per (key, route), kept in memory and flushed to the outbox by ``record``
    (the API's writer)."""

    def __init__(self, record: Callable[[list[tuple[str, str, int, float]]], Awaitable[None]]) -> None:
        self.record = record
        self.pending: dict[tuple[str, str], list[float]] = {}  # (key, route) -> [count, last]
        self._task: asyncio.Task[None] | None = None

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
            await self.record(rows)
        except Exception as exc:  # counters are best effort; requests are never refused for them
            log.warning("api_usage_not_saved", error=str(exc), entries=len(rows))

    async def close(self) -> None:
        """Stop flushing every few seconds, and flush what is counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
