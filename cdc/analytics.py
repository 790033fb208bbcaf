"""``marketplace.analytics``: one event per period with the period's KPIs.

Periods are fixed slices of Unix time (``period`` seconds, aligned to the epoch: with the
hourly default, 14:00 to 15:00 UTC), each emitted once it has ended and ``settle`` seconds
more have passed (for transactions still committing at its end).  The figures are those
of ``GET /analytics`` for the same slice: the shell passes in the function that computes
them, read-only with a statement timeout.

Exactly once: the event is appended together with a marker of its period, in one outbox
transaction that first checks the marker (``emit_once``, given by the shell), so two
processes racing, or a restart after a crash, never emit a period twice.  Periods missed
while the sidecar was down are emitted on start, at most ``catch_up`` of them (the
newest); older ones are logged as skipped.  A failing or slow source only delays the
event: it is logged and tried again, and capture and delivery never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from common.formats import unix_to_iso

log = structlog.get_logger("ct1_cdc.analytics")

EVENT_TYPE = "marketplace.analytics"
KIND = "analytics"  # the period markers' kind in the derived state


@dataclass(frozen=True, slots=True)
class Schedule:
    period: float = 3600.0
    catch_up: int = 24
    settle: float = 5.0
    retry: float = 30.0  # after a failure, try again this much later (at most a period)
    timeout: float = 120.0  # a period's figures taking longer than this count as a failure

    def bounds(self, index: int) -> tuple[float, float]:
        return index * self.period, (index + 1) * self.period

    def newest_complete(self, now: float) -> int:
        """The index of the newest period that has ended and settled at ``now``."""
        return math.floor((now - self.settle) / self.period) - 1

    def due(self, now: float, last_start: float | None) -> tuple[list[int], int]:
        """The periods to emit now, oldest first, and how many missed ones are skipped
        (beyond ``catch_up``), given the start of the last period emitted (of whatever
        length: the period holding it counts as done).  Without any emitted yet, only the
        newest complete one."""
        newest = self.newest_complete(now)
        if last_start is None:
            return [newest], 0
        missed = list(range(math.floor(last_start / self.period) + 1, newest + 1))
        if len(missed) > self.catch_up:
            return missed[-self.catch_up :], len(missed) - self.catch_up
        return missed, 0

    def next_at(self, now: float) -> float:
        """When the next period becomes due."""
        return (self.newest_complete(now) + 2) * self.period + self.settle


def moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def data(schedule: Schedule, index: int, figures: dict[str, Any]) -> dict[str, Any]:
    """The event's ``data``: the period and the figures of ``GET /analytics`` for it."""
    start, end = schedule.bounds(index)
    shown = {k: v for k, v in figures.items() if k != "period"}  # /analytics's own dates: these are exact
    record = {"period_start": unix_to_iso(start), "period_end": unix_to_iso(end), **shown}
    return {"object": "analytics", "id": unix_to_iso(start), "record": record, "previous": None}


# (start, end, start of the previous period of the same length) -> the figures
Compute = Callable[[datetime, datetime, datetime], Awaitable[dict[str, Any]]]
# (period start, period length, its data, its end as ISO text) -> whether it was appended
# now (False: already there); also records the start as the newest emitted, in the same commit
EmitOnce = Callable[[float, float, dict[str, Any], str], Awaitable[bool]]


class AnalyticsEmitter:
    def __init__(
        self,
        schedule: Schedule,
        compute: Compute,
        emit_once: EmitOnce,
        last_emitted: Callable[[], Awaitable[float | None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schedule = schedule
        self.compute = compute
        self.emit_once = emit_once
        self.last_emitted = last_emitted
        self.clock = clock
        self.emitted = 0
        self.delayed = 0  # ticks that could not read the figures or append them

    async def tick(self) -> float:
        """Emit whatever is due; the number of seconds until it is worth looking again.
        Nothing raises out of it: a failure is logged and tried again later."""
        schedule = self.schedule
        retry = min(schedule.retry, schedule.period)
        start = 0.0
        try:
            indexes, skipped = schedule.due(self.clock(), await self.last_emitted())
            if skipped:
                log.warning("analytics_periods_skipped", periods=skipped, catch_up=schedule.catch_up)
            for index in indexes:
                start, end = schedule.bounds(index)
                began = self.clock()
                figures = await asyncio.wait_for(
                    self.compute(moment(start), moment(end), moment(start - schedule.period)),
                    schedule.timeout,
                )
                appended = await self.emit_once(
                    start, schedule.period, data(schedule, index, figures), unix_to_iso(end)
                )
                if appended:
                    self.emitted += 1
                    log.info(
                        "analytics_emitted",
                        period_start=unix_to_iso(start),
                        seconds=round(self.clock() - began, 3),
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.delayed += 1
            reason = "took longer than the timeout" if isinstance(exc, TimeoutError) else str(exc)
            log.warning(
                "analytics_delayed",
                period_start=unix_to_iso(start) if start else None,
                error=f"{type(exc).__name__}: {(reason.splitlines() or [''])[0][:200]}",
                retry_in=retry,
            )
            return retry
        return max(0.0, schedule.next_at(self.clock()) - self.clock())

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; a stop also ends a tick that waits on a slow source."""
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                tick = asyncio.ensure_future(self.tick())
                await asyncio.wait([tick, stopped], return_when=asyncio.FIRST_COMPLETED)
                if not tick.done():
                    tick.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await tick
                    return
                wait = tick.result()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopped), timeout=wait)
        finally:
            stopped.cancel()
