"""A webhook endpoint for CT2/CT3: an aiohttp server that verifies every request and hands
the envelope on.

    async with Receiver(WebhookVerifier(secret).verify, on_event=handle) as rx:
        print(rx.url)   # give this URL to ct1-cdc as the endpoint

``verify(body, headers)`` returns the envelope or raises (any exception): the request is
answered 401 and counted in ``rejected``.  A verified envelope is kept in ``received``
(with its headers), passed to ``on_event``, and answered 200; ct1-cdc retries anything
else.  ``before`` runs first on every request and may answer it instead (a receiver that
is down, slow or busy, in tests).  :class:`ThreadedReceiver` serves one from a thread of
its own, for code that is not async.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Verify = Callable[[bytes, Mapping[str, str]], dict[str, Any]]
OnEvent = Callable[[dict[str, Any], Mapping[str, str]], None]
Before = Callable[[web.Request, int], Awaitable[web.StreamResponse | None]]


@dataclass(frozen=True, slots=True)
class Received:
    envelope: dict[str, Any]
    headers: dict[str, str]

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    def __init__(
        self,
        verify: Verify,
        on_event: OnEvent | None = None,
        *,
        before: Before | None = None,
        on_rejected: Callable[[Mapping[str, str], Exception], None] | None = None,
        path: str = "/hook",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.verify = verify
        self.on_event = on_event
        self.before = before
        self.on_rejected = on_rejected
        self.path, self.host, self.port = path, host, port
        self.received: list[Received] = []
        self.calls = 0  # every request, answered or not
        self.rejected = 0  # requests that did not verify
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def forget(self) -> None:
        """Start counting afresh: no request received or rejected yet."""
        self.received.clear()
        self.calls = self.rejected = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.read()
        if self.before is not None:
            answer = await self.before(request, self.calls)
            if answer is not None:
                return answer
        headers = dict(request.headers)
        try:
            envelope = self.verify(body, headers)
        except Exception as exc:
            self.rejected += 1
            if self.on_rejected is not None:
                self.on_rejected(headers, exc)
            return web.Response(status=401, text="invalid webhook")
        self.received.append(Received(envelope, headers))
        if self.on_event is not None:
            self.on_event(envelope, headers)
        return web.Response(text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


class ThreadedReceiver:
    """A :class:`Receiver` served by an event loop in a thread of its own."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="receiver")

    def __enter__(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self._loop).result(10)
        return self.receiver

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
