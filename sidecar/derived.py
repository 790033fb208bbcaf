"""The derived events that run beside capture: ``marketplace.analytics`` (cart.abandoned
runs inside capture's loop, judged by the stream).

The emitter gets the figures from the same code as ``GET /analytics`` (read-only, with
the exports' statement timeout) and appends each period's event through a writer of its
own with a mark per period, so it is appended once however many processes run it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from api.exports import Exports
from cdc.analytics import EVENT_TYPE, KIND, AnalyticsEmitter, Schedule
from config.settings import Settings
from outbox.store import open_outbox
from outbox.writer import OutboxWriter

LAST = "last"  # the mark holding the newest period emitted


class AnalyticsRole:
    def __init__(self, settings: Settings, router: Any, excluded: frozenset[str]) -> None:
        cfg = settings.analytics
        self.settings = settings
        self.router = router
        self.exports = Exports(settings, excluded)
        self.schedule = Schedule(
            cfg.period_seconds, cfg.catch_up_periods, cfg.settle_seconds, cfg.retry_seconds
        )
        self.writer: OutboxWriter | None = None
        self.emitter = AnalyticsEmitter(self.schedule, self._figures, self._emit_once, self._last)

    async def _figures(self, start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        return await self.exports.analytics_figures(start, end, before)

    def _writer(self) -> OutboxWriter:
        if self.writer is None:
            self.writer = OutboxWriter(open_outbox(self.settings.outbox.path), self.router)
        return self.writer

    async def _emit_once(self, index: int, data: dict[str, Any], at: str) -> bool:
        def append() -> bool:
            writer = self._writer()
            event = (EVENT_TYPE, "analytics", data["id"], data, at, None, "derived", None, None)
            appended = writer.add_once(KIND, f"period:{index}", *event)
            last = writer.state.state_get(KIND, LAST)
            if last is None or index > last:  # also when another process appended it
                writer.state.state_put(KIND, LAST, index, None, None)
                writer.commit(None)
            return appended

        return await asyncio.to_thread(append)

    async def _last(self) -> int | None:
        def read() -> int | None:
            value = self._writer().state.state_get(KIND, LAST)
            return None if value is None else int(value)

        return await asyncio.to_thread(read)

    async def run(self, stop: asyncio.Event) -> None:
        await self.exports.open()
        try:
            await self.emitter.run(stop)
        finally:
            await self.exports.close()
            if self.writer is not None:
                self.writer.close()
