"""The receiver kit (ct1_client.kit) against real deliveries from the dispatcher: each
event handled once though delivered again (a replay, a restart of the receiver), a failing
handler answered 500 so the sidecar retries, a rotated secret, a forged request refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from ct1_client.kit import SqliteSeen, webhook_handler
from ct1_client.models import Event, Order
from dispatcher.signing import generate_secret
from dispatcher.worker import Dispatcher
from tests.integration.test_dispatch import append, deliveries, run_until, settings_for


class KitReceiver:
    """An aiohttp app on loopback whose one route is the kit's handler."""

    def __init__(
        self, secrets: list[str], seen: SqliteSeen, fail_first: set[int] | None = None, typed: bool = False
    ) -> None:
        self.handled: list[Any] = []
        self.fail_first = set(fail_first or ())
        self.calls: dict[int, int] = {}
        self.requests = 0  # every request, handled or answered as a duplicate

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests += 1
            response: web.StreamResponse = await handler(request)
            return response

        self.app = web.Application(middlewares=[count])
        self.app.router.add_post("/hook", webhook_handler(secrets, self.handle, seen, typed=typed))
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    async def handle(self, envelope: Any) -> None:
        event_id = envelope.id if isinstance(envelope, Event) else envelope["id"]
        self.calls[event_id] = self.calls.get(event_id, 0) + 1
        if event_id in self.fail_first and self.calls[event_id] == 1:
            raise RuntimeError("the receiver's database hiccuped")
        self.handled.append(envelope)

    async def __aenter__(self) -> KitReceiver:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def test_each_event_is_handled_once_through_retries_replays_and_a_restart(tmp_path: Path) -> None:
    from tests.acceptance.helpers import cli
    from tests.integration.test_dispatch import SECRET

    seen = SqliteSeen(tmp_path / "seen.db")
    async with KitReceiver([SECRET], seen, fail_first={2}) as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [("order.created", "order", i) for i in range(3)])
        await run_until(Dispatcher(settings), lambda: len(rx.handled) == 3)
        assert rx.calls == {1: 1, 2: 2, 3: 1}  # event 2's handler failed once: 500, retried
        assert deliveries(settings)[2] == ("delivered", 2)
    seen.close()

    seen = SqliteSeen(tmp_path / "seen.db")  # the receiver restarted: what it handled stays handled
    async with KitReceiver([SECRET], seen) as again:
        settings = settings_for(tmp_path, again.url)
        config = tmp_path / "c.toml"
        config.write_text(f"[outbox]\npath = {settings.outbox.path!r}\n")
        replay = await asyncio.to_thread(cli, "outbox", "replay", "--event", "1", "--json", config=config)
        assert json.loads(replay.stdout)["replayed"] == 1
        await run_until(Dispatcher(settings), lambda: deliveries(settings)[1] == ("delivered", 1))
        assert again.requests == 1  # delivered again (the same webhook-id), answered 200 ...
        assert again.handled == []  # ... and not handled twice
    seen.close()


async def test_a_rotated_secret_and_a_forged_request(tmp_path: Path) -> None:
    old, new = generate_secret(), generate_secret()
    seen = SqliteSeen(tmp_path / "seen.db")
    async with KitReceiver([new, old], seen) as rx:  # the receiver already knows the new one
        settings = settings_for(tmp_path, rx.url)
        settings.endpoints[0].secret = old  # the sidecar still signs with the old one
        append(settings, [("order.created", "order", 1)])
        await run_until(Dispatcher(settings), lambda: len(rx.handled) == 1)
        settings.endpoints[0].secret, settings.endpoints[0].previous_secret = new, old  # rotating
        append(settings, [("order.created", "order", 2)])
        await run_until(Dispatcher(settings), lambda: len(rx.handled) == 2)
        async with ClientSession() as http:
            forged = await http.post(
                rx.url,
                data=b'{"id": 99}',
                headers={"webhook-id": "evt_99", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"},
            )
            assert forged.status == 401 and "invalid webhook" in await forged.text()
        assert [e["id"] for e in rx.handled] == [1, 2]
    seen.close()


async def test_the_handler_gets_the_typed_event_by_default(tmp_path: Path) -> None:
    from tests.integration.test_dispatch import SECRET

    async with KitReceiver([SECRET], SqliteSeen(tmp_path / "seen.db"), typed=True) as rx:
        settings = settings_for(tmp_path, rx.url)
        append(settings, [("order.created", "order", 7)])
        await run_until(Dispatcher(settings), lambda: len(rx.handled) == 1)
    (event,) = rx.handled
    assert isinstance(event, Event) and isinstance(event.data.record, Order)
    assert event.type == "order.created" and event.data.id == 7
