"""A dispatcher that shares the partitions with others (the JetStream backend's dispatch
nodes, outbox/jetstream_leases.py), on a real outbox file and a real receiver: it
delivers only the partitions it is given, a partition taken over is sent from the
progress handed over (what it read past meanwhile included, in order), a partition given
up reports where it got to, and its pending retries go with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from common.errors import ConfigError
from dispatcher.worker import Dispatcher
from outbox import store
from outbox.deliveries import Superseded, partition_of
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from tests.integration.test_dispatch import Receiver, append, settings_for
from tests.outbox_helpers import append_events
from tests.sink_contract import AT

PARTS = 4
ENTITIES = 12  # (every partition gets some: checked below)


def part(key: int) -> int:
    return partition_of(f"order:{key}", PARTS)


def orders(n: int) -> list[tuple[str, str, Any]]:
    return [("order.updated", "order", i % ENTITIES) for i in range(n)]


@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[Dispatcher]:
    """A dispatcher sharing PARTS partitions, run until the block ends."""
    dispatcher = Dispatcher(settings, partitions=PARTS)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await until(dispatcher.started.is_set, "the dispatcher started")
        yield dispatcher
    finally:
        stop.set()
        await task


async def until(check: Callable[[], bool], what: str, within: float = 20) -> None:
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.02)


async def assigned(dispatcher: Dispatcher, parts: set[int], starts: dict[int, int] | None = None) -> Any:
    starts_of = {"ct2": starts} if starts else {}
    return await asyncio.wrap_future(dispatcher.assign(frozenset(parts), starts_of))


def keys_of(rx: Any) -> list[int]:
    return [json.loads(json.dumps(r.envelope))["data"]["id"] for r in rx.received]


async def test_only_the_partitions_given_are_delivered_and_one_taken_over_goes_on_from_its_progress(tmp_path):
    assert {part(k) for k in range(ENTITIES)} == set(range(PARTS))
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, orders(120))
        async with running(settings) as dispatcher:
            await asyncio.sleep(0.3)
            assert rx.received == []  # none held: nothing sent, and nothing read past
            await assigned(dispatcher, {0, 1})
            mine = [i + 1 for i, (_, _, k) in enumerate(orders(120)) if part(k) in {0, 1}]
            await until(lambda: len(rx.received) == len(mine), "partitions 0 and 1 delivered")
            await asyncio.sleep(0.3)
            assert sorted(r.envelope["id"] for r in rx.received) == mine
            # another dispatcher settled partition 2 up to event 60 and 3 up to 0: the
            # rest of each is sent, in order per order (this one read past them already)
            applied = await assigned(dispatcher, {0, 1, 2, 3}, {2: 60, 3: 0})
            assert applied["ct2"]["horizon"] == 120
            wanted = mine + [
                i + 1
                for i, (_, _, k) in enumerate(orders(120))
                if part(k) == 3 or (part(k) == 2 and i + 1 > 60)
            ]
            await until(lambda: len(rx.received) == len(wanted), "the taken partitions sent")
            append(settings, orders(24))  # (ids 121..144, every partition now)
            dispatcher.notify()
            await until(lambda: len(rx.received) == len(wanted) + 24, "new events of every partition")
            got = [r.envelope["id"] for r in rx.received]
            assert sorted(got) == sorted(wanted + list(range(121, 145)))
            for key in range(ENTITIES):  # each order's events in order
                ids = [r.envelope["id"] for r in rx.received if r.envelope["data"]["id"] == key]
                assert ids == sorted(ids), (key, ids)
            # settled once the dispatcher has recorded the last answers, a moment after the
            # receiver has them (seen in CI: 139-141 measured at once)
            settled = {"ct2": ({p: 144 for p in range(PARTS)}, 0)}  # (and the cursor's generation)
            for _ in range(250):
                progress = await asyncio.wrap_future(dispatcher.progress())
                if progress == settled:
                    break
                await asyncio.sleep(0.02)
            assert progress == settled
            # giving up 1, 2 and 3: where each got to, for the next holder
            given = await assigned(dispatcher, {0})
            assert given["ct2"]["settled"] == {1: 144, 2: 144, 3: 144}
            append(settings, orders(12))
            dispatcher.notify()
            zero = [145 + i for i in range(12) if part(i) == 0]
            await until(lambda: len(rx.received) == len(wanted) + 24 + len(zero), "partition 0 only")
            await asyncio.sleep(0.3)
            assert sorted(r.envelope["id"] for r in rx.received)[-len(zero) :] == zero
    assert dispatcher.final == {"ct2": {0: 156}}


async def test_a_partition_given_up_hands_its_pending_retry_to_the_next_holder(tmp_path):
    failing = part(0)

    async def entity_zero_fails(request: web.Request, call: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        return web.Response(status=503) if body["data"]["id"] == 0 else web.Response()

    async with Receiver(entity_zero_fails) as rx:
        settings = settings_for(tmp_path, rx.url, retry_schedule=[0, 30, 30])
        append(settings, orders(24))
        async with running(settings) as dispatcher:
            await assigned(dispatcher, set(range(PARTS)))
            others = [i + 1 for i, (_, _, k) in enumerate(orders(24)) if k != 0]
            await until(lambda: len(rx.received) == len(others), "all but order 0")
            with store.connect(settings.outbox.path, readonly=True) as conn:
                pending = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()
            assert pending[0] >= 1  # order 0's first event waits for its retry, the rest behind it
            given = await assigned(dispatcher, set(range(PARTS)) - {failing})
            # the next holder goes on from below order 0's first event: it sends it again
            assert given["ct2"]["settled"] == {failing: 0}
            with store.connect(settings.outbox.path, readonly=True) as conn:
                left = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()
            assert left[0] == 0  # the retry went with the partition


async def test_a_dispatch_node_without_an_endpoints_secret_refuses_to_start(tmp_path):
    settings = settings_for(tmp_path, "http://127.0.0.1:9/hook")
    settings.endpoints[0].secret = None
    append(settings, orders(1))
    with pytest.raises(ConfigError, match="ct2 has no secret on this dispatch node"):
        await Dispatcher(settings, partitions=PARTS).run(asyncio.Event())


async def test_an_urgent_change_cuts_a_send_short_and_hands_its_event_over(tmp_path):
    """The leases may lapse (not renewed in time): a send to a receiver that hangs is not
    waited for; its event stays below the progress handed over, so the next holder sends it."""
    hanging = part(0)
    release = asyncio.Event()

    async def order_zero_hangs(request: web.Request, call: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body["data"]["id"] == 0:
            await release.wait()
        return web.Response()

    async with Receiver(order_zero_hangs) as rx:
        settings = settings_for(tmp_path, rx.url)
        settings.dispatcher.timeout_seconds = 30  # (far longer than a lease)
        append(settings, orders(24))
        async with running(settings) as dispatcher:
            try:
                await assigned(dispatcher, set(range(PARTS)))
                others = [i + 1 for i, (_, _, k) in enumerate(orders(24)) if part(k) != hanging]
                await until(lambda: len(rx.received) >= len(others), "all but order 0's partition")
                started = asyncio.get_running_loop().time()
                future = dispatcher.assign(frozenset(set(range(PARTS)) - {hanging}), {}, urgent=True)
                given = await asyncio.wait_for(asyncio.wrap_future(future), 10)
                assert asyncio.get_running_loop().time() - started < 5  # not the send's 30 s
                assert given["ct2"]["settled"][hanging] == 0  # order 0's first event: not settled here
                with store.connect(settings.outbox.path, readonly=True) as conn:
                    left = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()
                    state = conn.execute("SELECT state FROM endpoints WHERE name = 'ct2'").fetchone()
                assert left[0] == 0  # its retry went with the partition
                assert state == ("active",)  # (a cut send is not the receiver's failure)
            finally:
                release.set()  # (the hanging answer, before the stop)


async def test_a_change_replaced_before_it_was_applied_is_not_taken_as_done(tmp_path):
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, orders(4))
        async with running(settings) as dispatcher:
            first = dispatcher.assign(frozenset({0, 1}), {})
            second = dispatcher.assign(frozenset({0}), {})
            with pytest.raises(Superseded):
                await asyncio.wrap_future(first)
            assert set((await asyncio.wrap_future(second))["ct2"]) == {"horizon", "settled", "generation"}


async def test_a_partition_taken_over_sends_a_manual_event_to_the_endpoints_it_names_alone(tmp_path):
    """A manual event narrowed by `systems` (its rows made at append, for ct2 alone) in a
    partition taken over from another dispatcher: the rows the take makes from the progress
    handed over follow the event's own endpoints, never its type's routes."""
    async with Receiver() as rx2, Receiver() as rx3:
        settings = settings_for(tmp_path, rx2.url)
        settings.endpoints.append(settings.endpoints[0].model_copy(update={"name": "ct3", "url": rx3.url}))
        names = [e.name for e in settings.endpoints]
        append_events(settings.outbox.path, names, orders(8))
        writer = OutboxWriter(
            store.open_outbox(settings.outbox.path), Router([Route(n, ("*",)) for n in names])
        )
        try:
            writer.add("ops.notice", "manual", None, {"n": 1}, AT, None, "manual", None, None, None, ["ct2"])
            writer.commit(None)
        finally:
            writer.close()
        append_events(settings.outbox.path, names, orders(8))  # (ids 10..17)
        async with running(settings) as dispatcher:
            manual = partition_of("manual:", PARTS)
            first = {p for p in range(PARTS) if p != manual}
            await assigned(dispatcher, first)  # every event read past, those of `first` sent
            sent = sum(1 for _, _, k in orders(8) if part(k) in first) * 2
            await until(lambda: len(rx2.received) == len(rx3.received) == sent, "the first partitions")
            # the manual event's partition, handed over by a holder that settled nothing
            applied = await asyncio.wrap_future(
                dispatcher.assign(frozenset(range(PARTS)), {"ct2": {manual: 0}, "ct3": {manual: 0}})
            )
            assert applied["ct3"]["horizon"] == 17  # (read past: the take makes its rows)
            await until(lambda: len(rx2.received) >= 17 and len(rx3.received) >= 16, "every delivery")
            await asyncio.sleep(0.3)
        assert sorted(r.envelope["id"] for r in rx2.received) == list(range(1, 18))
        assert sorted(r.envelope["id"] for r in rx3.received) == [*range(1, 9), *range(10, 18)]
