"""marketplace.analytics's schedule and emitter with plain values: the clock, the figures
and the outbox's exactly-once append are passed in."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from cdc.analytics import AnalyticsEmitter, Schedule, data

HOUR = Schedule(period=3600, catch_up=3, settle=5)


def test_a_period_is_due_once_it_ended_and_settled():
    t = 10 * 3600.0  # 10:00:00
    assert HOUR.due(t + 4, last_start=8 * 3600) == ([], 0)  # 09:00-10:00 not settled yet
    assert HOUR.due(t + 5, last_start=8 * 3600) == ([9], 0)
    assert HOUR.due(t + 3000, last_start=9 * 3600) == ([], 0)
    assert HOUR.next_at(t + 3000) == 11 * 3600 + 5


def test_missed_periods_are_caught_up_up_to_a_bound():
    t = 20 * 3600.0 + 10
    assert HOUR.due(t, last_start=17 * 3600) == ([18, 19], 0)
    assert HOUR.due(t, last_start=10 * 3600) == ([17, 18, 19], 6)  # 11..16 skipped
    assert HOUR.due(t, last_start=None) == ([19], 0)  # a fresh outbox: the newest one only


def test_a_new_period_length_goes_on_from_the_last_period_emitted():
    t = 20 * 3600.0 + 10
    assert HOUR.due(t, last_start=18.5 * 3600) == ([19], 0)  # was half-hourly: 18:30-19:00 done
    half = Schedule(period=1800, catch_up=3, settle=5)
    assert half.due(t, last_start=18 * 3600) == ([37, 38, 39], 0)  # was hourly: 18:00-19:00 done


def test_the_event_data_names_its_period():
    d = data(HOUR, 1, {"gmv": "10.00", "orders": 1})
    assert d == {
        "object": "analytics",
        "id": "1970-01-01T01:00:00.000000Z",
        "record": {
            "period_start": "1970-01-01T01:00:00.000000Z",
            "period_end": "1970-01-01T02:00:00.000000Z",
            "gmv": "10.00",
            "orders": 1,
        },
        "previous": None,
    }


class Outbox:
    """The exactly-once append, as the outbox gives it: a mark per period and the newest
    start emitted, raised in the same commit."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict[str, Any], str]] = []
        self.markers: set[tuple[float, float]] = set()
        self.newest: float | None = None

    async def emit_once(self, start: float, period: float, data: dict[str, Any], at: str) -> bool:
        self.newest = start if self.newest is None else max(self.newest, start)
        if (start, period) in self.markers:
            return False
        self.markers.add((start, period))
        self.events.append((int(start // period), data, at))
        return True

    async def last(self) -> float | None:
        return self.newest


async def test_two_emitters_racing_emit_each_period_once():
    outbox = Outbox()
    calls: list[tuple[datetime, datetime, datetime]] = []

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        calls.append((start, end, before))
        await asyncio.sleep(0)  # let the other one run in between
        return {"gmv": "1.00"}

    now = [5 * 3600.0 + 6]
    emitters = [
        AnalyticsEmitter(HOUR, compute, outbox.emit_once, outbox.last, lambda: now[0]) for _ in range(2)
    ]
    await asyncio.gather(*(e.tick() for e in emitters))
    assert [i for i, _, _ in outbox.events] == [4]
    now[0] += 2 * 3600
    await asyncio.gather(*(e.tick() for e in emitters))
    assert [i for i, _, _ in outbox.events] == [4, 5, 6]
    assert sum(e.emitted for e in emitters) == 3
    start, end, before = calls[0]
    assert (end - start).total_seconds() == 3600 and (start - before).total_seconds() == 3600


async def test_a_failing_source_delays_the_event_and_is_tried_again(caplog):
    outbox = Outbox()
    failures = [RuntimeError("canceling statement due to statement timeout")]

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        if failures:
            raise failures.pop()
        return {"gmv": "2.00"}

    emitter = AnalyticsEmitter(
        Schedule(period=60, settle=1, retry=7), compute, outbox.emit_once, outbox.last, lambda: 121.0
    )
    assert await emitter.tick() == 7  # delayed, to be tried again in 7 s
    assert emitter.delayed == 1
    assert outbox.events == []
    wait = await emitter.tick()
    assert [i for i, _, _ in outbox.events] == [1] and 0 < wait <= 60


async def test_the_emitter_stops_when_asked():
    outbox = Outbox()

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        return {}

    stop = asyncio.Event()
    emitter = AnalyticsEmitter(Schedule(period=3600), compute, outbox.emit_once, outbox.last)
    task = asyncio.create_task(emitter.run(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(outbox.events) == 1


@pytest.mark.parametrize("period", [1, 60, 3600, 86400])
def test_consecutive_periods_tile_time(period):
    s = Schedule(period=period)
    assert s.bounds(7)[1] == s.bounds(8)[0]


async def test_a_stop_ends_a_tick_that_waits_on_a_slow_source():
    outbox = Outbox()
    started = asyncio.Event()

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(3600)  # a source that never answers
        return {}

    stop = asyncio.Event()
    emitter = AnalyticsEmitter(Schedule(period=3600), compute, outbox.emit_once, outbox.last)
    task = asyncio.create_task(emitter.run(stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert outbox.events == []


async def test_nothing_raises_out_of_a_tick():
    outbox = Outbox()

    async def broken_last() -> float | None:
        raise OSError("outbox locked")

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        return {}

    emitter = AnalyticsEmitter(
        Schedule(period=60, retry=3), compute, outbox.emit_once, broken_last, lambda: 500.0
    )
    assert await emitter.tick() == 3 and emitter.delayed == 1


async def test_a_source_that_hangs_is_given_up_after_the_timeout():
    outbox = Outbox()

    async def compute(start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    schedule = Schedule(period=60, retry=3, timeout=0.05)
    emitter = AnalyticsEmitter(schedule, compute, outbox.emit_once, outbox.last, lambda: 500.0)
    assert await asyncio.wait_for(emitter.tick(), 5) == 3 and emitter.delayed == 1 and outbox.events == []
