"""The composition root: builds the parts of a run from settings and wires them."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from cdc.capture import Capture
from cdc.errors import ConfigError
from cdc.mapping import Mapping, load_mapping
from config.settings import Settings
from dispatcher.worker import Dispatcher
from outbox.checkpointer import Checkpointer
from outbox.store import Route, Router, open_outbox
from outbox.writer import OutboxWriter

log = structlog.get_logger("ct1_cdc.run")

ROLES = ("capture", "dispatch", "api")
GC_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default: 700)


def tune_gc() -> tuple[int, int, int]:
    """A long-running stream processor allocates many short-lived objects per row and per
    delivery: collect the young generation less often, and keep what startup built out of
    every collection.  Returns the previous thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, previous[1], previous[2])
    return previous


def parse_roles(text: str | None) -> list[str]:
    if not text:
        return list(ROLES)
    roles = [r.strip() for r in text.split(",") if r.strip()]
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: this version runs {', '.join(ROLES)}")
    return roles


def router_for(settings: Settings) -> Router:
    return Router([Route(e.name, tuple(e.events)) for e in settings.endpoints if e.enabled])


def build_capture(
    settings: Settings,
    mapping: Mapping | None = None,
    on_commit: Callable[[], None] | None = None,
) -> Capture:
    mapping = mapping or load_mapping(settings.mapping.file)
    conn = open_outbox(settings.outbox.path)
    writer = OutboxWriter(conn, router_for(settings), checkpointer=Checkpointer(settings.outbox.path))
    return Capture(settings, mapping, writer, on_commit=on_commit)


async def run(settings: Settings, roles: Sequence[str]) -> None:
    """Run the chosen roles on one loop until SIGINT/SIGTERM or a stage fails."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dispatcher = Dispatcher(settings) if "dispatch" in roles else None
    app = None
    if "api" in roles:
        from aiohttp import web

        from api.app import FEED, create_app

        app = create_app(settings)
    # after each outbox commit: wake the dispatcher and the API's waiting requests
    listeners = [f for f in (dispatcher and dispatcher.notify, app and app[FEED].notify) if f]

    def committed() -> None:
        for listener in listeners:
            listener()

    capture = build_capture(settings, on_commit=committed) if "capture" in roles else None
    tasks: list[asyncio.Future[Any]] = []
    if capture is not None:
        tasks.append(asyncio.ensure_future(asyncio.to_thread(capture.run)))
    if dispatcher is not None:
        tasks.append(asyncio.ensure_future(dispatcher.run(stop)))
    runner = None
    if app is not None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, settings.api.host, settings.api.port).start()
        log.info("api_listening", host=settings.api.host, port=settings.api.port)
    tune_gc()  # after startup: what it built stays out of every collection
    log.info("run_started", roles=list(roles))
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        if capture is not None:
            capture.stop()
        waiter.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if capture is not None:
            capture.writer.close()
        if runner is not None:
            await runner.cleanup()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    log.info("run_stopped")
