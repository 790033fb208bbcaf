"""The endpoint loop with its read beside the sends: it must not spin, must notice an
operator's change under traffic, must hold its limit when a chain goes on, and must
survive a failed read.  (Found by a review of the change; each test failed before its fix.)"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest
from aiohttp import web

from dispatcher.worker import Dispatcher
from outbox import deliveries, endpoints, store
from outbox.deliveries import DeliveryStore
from tests.integration.test_dispatch import Receiver, append, settings_for


async def _start(settings: Any) -> tuple[Dispatcher, asyncio.Event, asyncio.Task[None]]:
    dispatcher = Dispatcher(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    async with asyncio.timeout(5):
        while "ct2" not in dispatcher.runtimes:
            await asyncio.sleep(0.01)
    return dispatcher, stop, task


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    reads = [0]
    real = DeliveryStore.next_batch

    def counting(self: DeliveryStore, *args: Any) -> Any:
        reads[0] += 1
        return real(self, *args)

    monkeypatch.setattr(DeliveryStore, "next_batch", counting)
    return reads


async def test_full_slots_with_events_waiting_do_not_read_back_to_back(tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    release = asyncio.Event()

    async def slow(request: web.Request, call: int) -> web.StreamResponse:
        await release.wait()  # every slot stays busy
        return web.Response()

    async with Receiver(slow) as rx:
        settings = settings_for(tmp_path, rx.url, endpoint_concurrency=4, timeout_seconds=30)
        append(settings, [("order.created", "order", i) for i in range(8)])  # 4 sent, 4 waiting
        _dispatcher, stop, task = await _start(settings)
        try:
            while rx.calls < 4:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            before = reads[0]
            await asyncio.sleep(1.0)
            idle_reads = reads[0] - before
        finally:
            release.set()
            stop.set()
            await task
    # a read when a commit says so, or at the poll (every 20 ms): not thousands a second
    assert idle_reads <= 60, f"{idle_reads} reads in one second with nothing new to read"


async def test_a_paused_endpoint_waiting_on_its_probe_does_not_read_back_to_back(tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    release = asyncio.Event()

    async def fail_then_hang(request: web.Request, call: int) -> web.StreamResponse:
        if call == 1:
            return web.Response(status=500)  # pauses the endpoint
        await release.wait()  # the probe is out until released
        return web.Response()

    async with Receiver(fail_then_hang) as rx:
        settings = settings_for(
            tmp_path,
            rx.url,
            endpoint_concurrency=1,
            timeout_seconds=30,
            pause_after_failures=1,
            probe_interval_seconds=0.2,
        )
        append(settings, [("order.created", "order", i) for i in range(10)])
        dispatcher, stop, task = await _start(settings)
        try:
            while rx.calls < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            before = reads[0]
            await asyncio.sleep(1.0)
            idle_reads = reads[0] - before
            assert dispatcher.runtimes["ct2"].state.state == "paused"
        finally:
            release.set()
            stop.set()
            await task
    assert idle_reads <= 60, f"{idle_reads} reads in one second while the probe is out"


@pytest.mark.parametrize("action", ["disable", "replay-from"])
async def test_an_operator_change_is_noticed_under_steady_traffic(tmp_path, monkeypatch, action):
    real = DeliveryStore.next_batch

    def slow_read(self: DeliveryStore, *args: Any) -> Any:
        time.sleep(0.03)  # reads on a busy machine follow each other without a gap
        return real(self, *args)

    monkeypatch.setattr(DeliveryStore, "next_batch", slow_read)
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url, endpoint_concurrency=8)
        append(settings, [("order.created", "order", 0)])
        feeding = True

        async def feed() -> None:
            n = 1
            while feeding:
                await asyncio.to_thread(
                    append, settings, [("order.created", "order", n + i) for i in range(5)]
                )
                n += 5
                await asyncio.sleep(0.003)

        dispatcher, stop, task = await _start(settings)
        feeder = asyncio.create_task(feed())
        try:
            await asyncio.sleep(1.0)
            rt = dispatcher.runtimes["ct2"]
            generation = rt.generation
            conn = store.connect(settings.outbox.path)
            if action == "disable":
                endpoints.set_state(conn, "ct2", "disabled", time.time())
            else:
                deliveries.replay_from(conn, "ct2", 1, now=time.time())
            conn.close()

            def noticed() -> bool:
                if action == "disable":
                    return rt.state.state == "disabled"
                return rt.rewinding or rt.generation != generation

            started = time.monotonic()
            while time.monotonic() - started < 3 and not noticed():
                await asyncio.sleep(0.02)
            assert noticed(), f"{action} not noticed within 3 s under traffic"
        finally:
            feeding = False
            await feeder
            stop.set()
            await task


async def test_a_limit_of_one_holds_when_an_entity_s_next_event_goes(tmp_path, monkeypatch):
    current = peak = 0
    real_finish = DeliveryStore.finish_many

    def slower_commit(self: DeliveryStore, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # an fsync on a busy disk: the next event of order 1 waits for it
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(DeliveryStore, "finish_many", slower_commit)

    async def track(request: web.Request, call: int) -> web.StreamResponse:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        try:
            await asyncio.sleep(0.5 if request.headers["webhook-id"] == "evt_3" else 0.01)
        finally:
            current -= 1
        return web.Response()

    async with Receiver(track) as rx:
        settings = settings_for(tmp_path, rx.url, endpoint_concurrency=1)
        append(
            settings,
            [
                ("order.created", "order", 1),
                ("order.updated", "order", 1),
                ("customer.created", "customer", 9),
            ],
        )
        _dispatcher, stop, task = await _start(settings)
        try:
            async with asyncio.timeout(10):
                while len(rx.received) < 3:
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
    assert peak == 1


async def test_a_read_that_fails_is_logged_and_the_endpoint_goes_on(tmp_path, monkeypatch, capsys):
    real = DeliveryStore.next_batch
    failures = [0]

    def fails_once(self: DeliveryStore, *args: Any) -> Any:
        if not failures[0]:
            failures[0] += 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, *args)

    monkeypatch.setattr(DeliveryStore, "next_batch", fails_once)
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        _dispatcher, stop, task = await _start(settings)
        try:
            await asyncio.sleep(0.3)
            append(settings, [("order.created", "order", 1)])
            async with asyncio.timeout(5):
                while not rx.received:
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
    logged = capsys.readouterr()
    assert failures[0] == 1 and "read_failed" in logged.out + logged.err
