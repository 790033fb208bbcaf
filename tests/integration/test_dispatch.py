"""The dispatcher against real aiohttp receivers on loopback and a real SQLite outbox."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from config.settings import Settings
from ct1_client import receiver
from dispatcher.signing import generate_secret
from dispatcher.worker import Dispatcher
from outbox import store
from outbox.deliveries import DeliveryStore
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from sidecar.throwaway import free_port
from tests.catalogue_check import CheckedReceiver
from tests.outbox_helpers import append_events

SECRET = generate_secret()
FAST = [0, 0.05, 0.05, 0.05, 0.05]

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def Receiver(handler: Handler | None = None, secret: str = SECRET) -> receiver.Receiver:
    """A webhook receiver on loopback that verifies every signature with the official
    standardwebhooks package and checks every envelope against its schema (a misfit fails
    the test at exit); ``handler`` may answer a request first (anything but a 200 is
    returned as it is, a 200 goes on to verification)."""

    async def before(request: web.Request, call: int) -> web.StreamResponse | None:
        assert handler is not None
        response = await handler(request, call)
        return None if response.status == 200 else response

    return CheckedReceiver(Webhook(secret).verify, before=before if handler else None)


def settings_for(tmp_path: Path, url: str, **dispatcher: Any) -> Settings:
    return Settings(
        outbox={"path": str(tmp_path / "outbox.db")},
        dispatcher={"retry_schedule": FAST, "timeout_seconds": 2, **dispatcher},
        endpoints=[{"name": "ct2", "url": url, "secret": SECRET, "events": ["*"]}],
    )


def append(settings: Settings, events: list[tuple[str, str, Any]]) -> None:
    """Append (type, object, entity id) events the way capture does."""
    append_events(settings.outbox.path, [e.name for e in settings.endpoints], events)


def deliveries(settings: Settings) -> dict[int, tuple[str, int]]:
    """Each event's delivery (status, attempts) as `outbox show` tells it: a row, a
    first-try success (no row), or pending past the cursor."""
    conn = store.connect(settings.outbox.path, readonly=True)
    try:
        rows = {}
        for (event_id,) in conn.execute("SELECT id FROM events").fetchall():
            for d in store.event_deliveries(conn, event_id):
                rows[event_id] = (d["status"], d["attempts"])
        return rows
    finally:
        conn.close()


async def run_until(dispatcher: Dispatcher, done: Callable[[], bool], timeout: float = 20) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task


async def test_delivers_signed_envelopes_that_verify_with_standardwebhooks(tmp_path):
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [("order.created", "order", 1), ("customer.created", "customer", 9)])
        await run_until(Dispatcher(settings), lambda: len(rx.received) == 2)
    first = rx.received[0]
    assert first.headers["webhook-id"] == "evt_1"
    assert first.headers["User-Agent"].startswith("ct1-cdc/")
    assert first.envelope["type"] == "order.created"
    assert first.envelope["data"]["record"] == {"id": 1, "n": 0}
    assert deliveries(settings) == {1: ("delivered", 1), 2: ("delivered", 1)}


async def test_per_entity_order_holds_under_concurrency_and_failures(tmp_path):
    rng = random.Random(3)

    async def flaky(request: web.Request, call: int) -> web.StreamResponse:
        await asyncio.sleep(rng.uniform(0, 0.01))
        if rng.random() < 0.3:
            return web.Response(status=503)
        return web.Response()

    events = [("order.updated", "order", i % 5) for i in range(100)]
    async with Receiver(flaky) as rx:
        settings = settings_for(
            tmp_path,
            rx.url,
            retry_schedule=[0] + [0.01] * 30,
            endpoint_concurrency=16,
            pause_after_failures=1000,
        )
        append(settings, events)
        await run_until(Dispatcher(settings), lambda: len(rx.received) >= 100, timeout=60)
    per_entity: dict[int, list[int]] = {}
    for item in rx.received:
        env = item.envelope
        per_entity.setdefault(env["data"]["id"], []).append(env["id"])
    for ids in per_entity.values():
        assert ids == sorted(ids), "an entity's events arrived out of order"
    assert sorted(i for ids in per_entity.values() for i in ids) == list(range(1, 101))


async def test_server_errors_retry_and_are_logged_then_dead(tmp_path):
    async def always_500(request: web.Request, call: int) -> web.StreamResponse:
        return web.Response(status=500, text="boom " + "x" * 5000)

    async with Receiver(always_500) as rx:
        settings = settings_for(tmp_path, rx.url, pause_after_failures=100)
        append(settings, [("order.created", "order", 1)])
        await run_until(Dispatcher(settings), lambda: deliveries(settings)[1][0] == "dead")
    assert rx.calls == len(FAST)
    conn = store.connect(settings.outbox.path, readonly=True)
    attempts = conn.execute("SELECT status, error, response FROM attempts ORDER BY id").fetchall()
    conn.close()
    assert [a[0] for a in attempts] == [500] * len(FAST)
    assert attempts[0][1] == "HTTP 500"
    assert attempts[0][2].startswith("boom") and len(attempts[0][2]) == 1024


async def test_gone_disables_the_endpoint_and_keeps_the_delivery_pending(tmp_path):
    async def gone(request: web.Request, call: int) -> web.StreamResponse:
        return web.Response(status=410)

    async with Receiver(gone) as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [("order.created", "order", 1), ("order.created", "order", 2)])
        dispatcher = Dispatcher(settings)
        await run_until(
            dispatcher,
            lambda: "ct2" in dispatcher.runtimes and dispatcher.runtimes["ct2"].state.state == "disabled",
        )
        await asyncio.sleep(0.3)
    assert rx.calls <= 2  # nothing more after the 410s
    assert {s for s, _ in deliveries(settings).values()} == {"pending"}
    reader = DeliveryStore(settings.outbox.path)
    assert reader.endpoint("ct2").state == "disabled"
    reader.close()


async def test_unreachable_endpoint_pauses_and_a_probe_resumes_it(tmp_path):
    up = False

    async def until_up(request: web.Request, call: int) -> web.StreamResponse:
        return web.Response() if up else web.Response(status=502)

    async with Receiver(until_up) as rx:
        settings = settings_for(
            tmp_path,
            rx.url,
            pause_after_failures=3,
            probe_interval_seconds=0.3,
            retry_schedule=[0] + [0.01] * 50,
            endpoint_concurrency=1,
        )
        append(settings, [("order.created", "order", i) for i in range(20)])
        dispatcher = Dispatcher(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            async with asyncio.timeout(20):
                while "ct2" not in dispatcher.runtimes or dispatcher.runtimes["ct2"].state.state != "paused":
                    await asyncio.sleep(0.01)
                calls_at_pause = rx.calls
                await asyncio.sleep(0.7)
                # while paused: only probes, one per interval
                assert rx.calls - calls_at_pause <= 3
                up = True
                while len(rx.received) < 20:
                    await asyncio.sleep(0.02)
            assert dispatcher.runtimes["ct2"].state.state == "active"
        finally:
            stop.set()
            await task
    attempts = deliveries(settings)
    assert all(s == "delivered" for s, _ in attempts.values())
    assert max(a for _, a in attempts.values()) < 50  # pausing saved the attempts


@pytest.mark.parametrize("behaviour", ["redirect", "hang", "close"])
async def test_redirects_hangs_and_dropped_connections_are_failures(tmp_path, behaviour):
    async def bad(request: web.Request, call: int) -> web.StreamResponse:
        if behaviour == "redirect":
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        if behaviour == "hang":
            await asyncio.sleep(5)
            return web.Response()
        request.transport.close()  # type: ignore[union-attr]
        return web.Response()

    async with Receiver(bad) as rx:
        settings = settings_for(
            tmp_path, rx.url, timeout_seconds=0.3, retry_schedule=[0], pause_after_failures=100
        )
        append(settings, [("order.created", "order", 1)])
        await run_until(Dispatcher(settings), lambda: deliveries(settings)[1][0] == "dead")
    conn = store.connect(settings.outbox.path, readonly=True)
    status, error = conn.execute("SELECT status, error FROM attempts").fetchone()
    conn.close()
    expected = {"redirect": (302, "HTTP 302"), "hang": (0, "timeout")}
    if behaviour in expected:
        assert (status, error) == expected[behaviour]
    else:
        assert status == 0 and error


def test_an_endpoint_url_that_cannot_be_a_request_line_is_refused(tmp_path):
    from common.errors import ConfigError

    for url, why in (
        ("http://127.0.0.1/a b", "space or a control character"),
        ("http://127.0.0.1/a\r\nX-Injected: 1", "space or a control character"),
        ("http://127.0.0.1:99999/hook", "bad port"),
        ("ftp://127.0.0.1/hook", "not an http"),
    ):
        with pytest.raises(ConfigError, match=why):
            Dispatcher(settings_for(tmp_path, url))


def test_plain_http_off_loopback_is_refused(tmp_path):
    from common.errors import ConfigError

    settings = settings_for(tmp_path, "http://example.invalid/hook")
    with pytest.raises(ConfigError, match="https"):
        Dispatcher(settings)
    ok = settings_for(tmp_path, "http://example.invalid/hook", require_https=False)
    Dispatcher(ok)


def test_private_addresses_are_refused_when_asked(tmp_path):
    from common.errors import ConfigError

    for url in ("http://10.1.2.3/hook", "https://192.168.0.9/hook", "http://[fd00::1]/hook"):
        settings = settings_for(tmp_path, url, require_https=False, refuse_private_networks=True)
        with pytest.raises(ConfigError, match="private address"):
            Dispatcher(settings)
    allowed = settings_for(tmp_path, "http://127.0.0.1:9/hook", refuse_private_networks=True)
    Dispatcher(allowed)


async def test_dead_deliveries_are_replayed_with_the_same_webhook_id(tmp_path):
    from tests.acceptance.helpers import cli

    healthy = False

    async def broken_then_fixed(request: web.Request, call: int) -> web.StreamResponse:
        return web.Response() if healthy else web.Response(status=500)

    async with Receiver(broken_then_fixed) as rx:
        settings = settings_for(tmp_path, rx.url, retry_schedule=[0], pause_after_failures=100)
        append(settings, [("order.created", "order", i) for i in range(3)])
        await run_until(
            Dispatcher(settings), lambda: {s for s, _ in deliveries(settings).values()} == {"dead"}
        )
        config = tmp_path / "c.toml"
        config.write_text(f"[outbox]\npath = {settings.outbox.path!r}\n")
        future = await asyncio.to_thread(
            cli, "outbox", "replay", "--dead", "--since", "2999-01-01T00:00:00", "--json", config=config
        )
        assert json.loads(future.stdout) == {"replayed": 0}
        replay = await asyncio.to_thread(
            cli, "outbox", "replay", "--dead", "--endpoint", "ct2", "--json", config=config
        )
        assert json.loads(replay.stdout) == {"replayed": 3}
        healthy = True
        await run_until(Dispatcher(settings), lambda: len(rx.received) == 3)
    assert [r.headers["webhook-id"] for r in rx.received] == ["evt_1", "evt_2", "evt_3"]
    assert deliveries(settings) == {1: ("delivered", 1), 2: ("delivered", 1), 3: ("delivered", 1)}


def test_claimed_body_is_the_outbox_envelope_byte_for_byte(tmp_path):
    settings = settings_for(tmp_path, "http://127.0.0.1:1/hook")
    path = settings.outbox.path
    writer = OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))]))
    awkward = {"name": 'Zoë "the" \\ \n\t\u0001 ✓ 🚀', "total": "59.90", "none": None, "n": [1, 2.5]}
    writer.add(
        "order.created",
        "order",
        5,
        {"object": "order", "id": 5, "record": awkward, "previous": None},
        "2026-11-25T00:00:00.000000Z",
        "public.orders",
        "insert",
        "0/1",
        2**40,
    )
    writer.commit("test", 1)
    writer.close()
    store_ = DeliveryStore(path)
    store_.materialize("ct2")
    (due,) = store_.claim("ct2", 1e12, 10, ())
    conn = store.connect(path, readonly=True)
    row = store.get_event(conn, 1)
    assert row is not None
    assert due.body == store.envelope_json(row).encode("utf-8")
    assert json.loads(due.body)["data"]["record"] == awkward
    store_.close()
    conn.close()


def test_claim_leaves_out_deliveries_in_flight_and_later_events_of_their_entity(tmp_path):
    settings = settings_for(tmp_path, "http://127.0.0.1:1/hook")
    append(settings, [("order.created", "order", k) for k in (1, 2, 3, 1)])
    store_ = DeliveryStore(settings.outbox.path)
    store_.materialize("ct2")
    assert [d.event_id for d in store_.claim("ct2", 1e12, 10, ())] == [1, 2, 3]
    assert [d.event_id for d in store_.claim("ct2", 1e12, 10, {1, 3})] == [2]
    assert [d.event_id for d in store_.claim("ct2", 1e12, 1, {1})] == [2]
    store_.close()


async def test_huge_response_body_is_read_only_up_to_the_limit(tmp_path):
    async def huge(request: web.Request, call: int) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        for _ in range(200):  # 20 MB, never read by the sender
            await response.write(b"y" * 100_000)
        return response

    async with Receiver(huge) as rx:
        settings = settings_for(tmp_path, rx.url, retry_schedule=[0], pause_after_failures=100)
        append(settings, [("order.created", "order", 1)])
        await run_until(Dispatcher(settings), lambda: deliveries(settings)[1][0] == "dead")
    conn = store.connect(settings.outbox.path, readonly=True)
    status, response = conn.execute("SELECT status, response FROM attempts").fetchone()
    conn.close()
    assert status == 500 and response == "y" * 1024


async def test_retry_after_is_honoured_and_429_slows_the_endpoint(tmp_path):
    times: list[float] = []

    async def busy_once(request: web.Request, call: int) -> web.StreamResponse:
        times.append(asyncio.get_running_loop().time())
        if call == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response()

    async with Receiver(busy_once) as rx:
        settings = settings_for(tmp_path, rx.url, retry_schedule=[0, 0.01], endpoint_concurrency=4)
        append(settings, [("order.created", "order", 1)])
        dispatcher = Dispatcher(settings)
        # halved by the 429 (4 -> 2), then +1 once the success is recorded
        await run_until(
            dispatcher,
            lambda: len(rx.received) == 1 and dispatcher.runtimes["ct2"].limit == 3,
        )
    assert times[1] - times[0] >= 0.95  # waited for Retry-After, not the 10 ms schedule


async def test_events_committed_by_another_connection_are_picked_up_without_a_wake_up(tmp_path):
    """Capture running in another process only commits to SQLite: the dispatcher must
    notice by itself (it polls SQLite's data_version)."""
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [])  # the outbox exists, empty
        dispatcher = Dispatcher(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(append, settings, [("order.created", "order", 42)])
            async with asyncio.timeout(10):
                while not rx.received:
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
    assert rx.received[0].envelope["data"]["id"] == 42


# -- stopping ----------------------------------------------------------------------------------


async def stops(task: asyncio.Task[None], timeout: float = 10) -> bool:
    """Whether ``task``, a dispatcher's run told to stop, ends within ``timeout``.  If not,
    its tasks are cancelled again until it does, so that the test fails instead of
    hanging in its teardown."""
    done, _ = await asyncio.wait([task], timeout=timeout)
    while not task.done():
        for other in asyncio.all_tasks():
            if getattr(other.get_coro(), "__qualname__", "").startswith("Dispatcher."):
                other.cancel()
        await asyncio.sleep(0.1)
    return task in done


async def test_a_stop_that_comes_with_a_commit_still_stops_the_dispatcher(tmp_path):
    """The run's stop and a commit's wake-up in the same instant (capture's last commit as
    SIGTERM comes): the endpoint's loop must still end, or `run` waits for it until the
    process is ended by force."""
    async with Receiver() as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [])  # nothing due: the endpoint's loop waits for a wake-up
        dispatcher = Dispatcher(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(0.3)
        dispatcher.notify()
        await asyncio.sleep(0)  # the wake-up is delivered ...
        stop.set()  # ... and the stop comes before the loop has seen it
        assert await stops(task), "the dispatcher did not stop"
        task.result()


async def test_a_paused_endpoint_waits_for_its_probe_without_spinning_while_events_come(tmp_path):
    """Events keep coming while an endpoint is paused: each wakes the dispatcher, but the
    paused endpoint has nothing to do until its probe and must not busy-loop meanwhile."""
    settings = settings_for(
        tmp_path,
        f"http://127.0.0.1:{free_port()}/webhooks",  # refused
        pause_after_failures=3,
        probe_interval_seconds=5,
    )
    append(settings, [("order.created", "order", i) for i in range(5)])
    dispatcher = Dispatcher(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        async with asyncio.timeout(20):
            while "ct2" not in dispatcher.runtimes or dispatcher.runtimes["ct2"].state.state != "paused":
                await asyncio.sleep(0.01)
        await asyncio.to_thread(append, settings, [("order.created", "order", 99)])
        dispatcher.notify()  # the commit's wake-up, as capture gives it in `run`
        cpu = time.process_time()
        await asyncio.sleep(1)
        cpu = time.process_time() - cpu
    finally:
        stop.set()
        stopped = await stops(task)
    assert cpu < 0.5, f"{cpu:.2f} s of CPU in 1 s while paused: the loop spins"
    assert stopped, "the dispatcher did not stop"
    assert {s for s, _ in deliveries(settings).values()} == {"pending"}


async def test_a_retry_blocks_its_entity_while_a_thousand_others_flow(tmp_path):
    """Rows made by the dispatcher from its cursor (capture appends events only): one
    order's first event fails until every other order's event is through; the thousand
    others are not held up, and that order's later events wait for it, in order."""
    from tests.outbox_helpers import append_events

    others_done = asyncio.Event()
    seen_blocked: list[int] = []

    async def first_fails(request: web.Request, call: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body["data"]["id"] == 0:
            seen_blocked.append(body["id"])
            if body["id"] == 1 and not others_done.is_set():
                return web.Response(status=503)
        return web.Response()

    events = [("order.updated", "order", 0)]
    events += [("order.updated", "order", i) for i in range(1, 1001)]
    events += [("order.updated", "order", 0), ("order.updated", "order", 0)]
    async with Receiver(first_fails) as rx:
        settings = settings_for(
            tmp_path,
            rx.url,
            retry_schedule=[0] + [0.05] * 200,
            endpoint_concurrency=32,
            pause_after_failures=10**6,
        )
        append_events(settings.outbox.path, ["ct2"], events, rows=False)

        def progress() -> bool:
            if sum(1 for r in rx.received if r.envelope["data"]["id"] != 0) == 1000:
                others_done.set()
            return len(rx.received) == 1003

        await run_until(Dispatcher(settings), progress, timeout=60)
    order = [r.envelope["id"] for r in rx.received]
    zero = [i for i in order if i in (1, 1002, 1003)]
    assert zero == [1, 1002, 1003]  # the order's events in order
    assert order.index(1) > max(order.index(i) for i in range(2, 1002))  # the others did not wait
    assert seen_blocked[-3:] == [1, 1002, 1003] and set(seen_blocked[:-2]) == {1}  # later ones held back
