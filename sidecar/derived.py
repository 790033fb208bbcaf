"""The derived events that run beside capture: ``marketplace.analytics`` (cart.abandoned
runs inside capture's loop, judged by the stream).

The emitter gets the figures from the same code as ``GET /analytics`` (read-only, with
the exports' statement timeout) and appends each period's event through a writer of its
own with a mark per period, so it is appended once however many processes run it.  On
the JetStream backend it appends through capture (:meth:`Capture.submit`), the stream's
one writer: event and mark in one of capture's group commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from api.exports import Exports
from cdc.analytics import EVENT_TYPE, KIND, AnalyticsEmitter, Schedule
from cdc.capture import Capture
from cdc.ports import Sink
from config.settings import Settings
from outbox.store import open_outbox
from outbox.writer import OutboxWriter

LAST = "last"  # the mark holding the newest period emitted


class AnalyticsRole:
    def __init__(
        self, settings: Settings, router: Any, excluded: frozenset[str], capture: Capture | None = None
    ) -> None:
        """``capture``: append through it (:meth:`Capture.submit`), inside its group
        commits, rather than to the outbox file: the JetStream backend's stream has one
        writer, capture."""
        cfg = settings.analytics
        self.settings = settings
        self.capture = capture
        self.router = router
        self.exports = Exports(settings, excluded)
        self.schedule = Schedule(
            cfg.period_seconds, cfg.catch_up_periods, cfg.settle_seconds, cfg.retry_seconds
        )
        self.writer: OutboxWriter | None = None
        self._appending: asyncio.Future[bool] | None = None
        self.emitter = AnalyticsEmitter(self.schedule, self._figures, self._emit_once, self._last)

    async def _figures(self, start: datetime, end: datetime, before: datetime) -> dict[str, Any]:
        return await self.exports.analytics_figures(start, end, before)

    def _writer(self) -> OutboxWriter:
        if self.writer is None:
            self.writer = OutboxWriter(open_outbox(self.settings.outbox.path), self.router)
        return self.writer

    async def _emit_once(self, start: float, period: float, data: dict[str, Any], at: str) -> bool:
        event = (EVENT_TYPE, "analytics", data["id"], data, at, None, "derived", None, None)
        mark = f"period:{start:.3f}:{period:.3f}"  # by start and length: a new period_seconds starts afresh
        if self.capture is not None:
            return bool(await self._through_capture(partial(_once, event, mark, start)))

        def append() -> bool:
            return self._writer().add_once(KIND, mark, event, newest=(LAST, start))

        # a stop does not cut the append short: run() waits for it before closing the writer
        self._appending = asyncio.ensure_future(asyncio.to_thread(append))
        return await asyncio.shield(self._appending)

    async def _through_capture(self, work: Callable[[Sink], Any]) -> Any:
        assert self.capture is not None
        return await asyncio.wait_for(asyncio.wrap_future(self.capture.submit(work)), CAPTURE_WITHIN)

    async def _last(self) -> float | None:
        if self.capture is not None:
            value = await self._through_capture(lambda sink: sink.state.state_get(KIND, LAST))
            return None if value is None else float(value)

        def read() -> float | None:
            value = self._writer().state.state_get(KIND, LAST)
            return None if value is None else float(value)

        return await asyncio.to_thread(read)

    async def run(self, stop: asyncio.Event) -> None:
        await self.exports.open()
        try:
            await self.emitter.run(stop)
        finally:
            if self._appending is not None and not self._appending.done():
                await asyncio.wait([self._appending], timeout=30)
            await self.exports.close()
            if self.writer is not None:
                self.writer.close()


CAPTURE_WITHIN = 60.0  # an append through capture not done by then is tried again later


def _once(event: tuple[Any, ...], mark: str, start: float, sink: Sink) -> bool:
    """On capture's thread: append ``event`` unless ``mark`` is in the state, the mark and
    the newest period start in the same group commit (as OutboxWriter.add_once does)."""
    state = sink.state
    appended = state.state_get(KIND, mark) is None
    if appended:
        sink.add(*event)
        state.state_put(KIND, mark, True, None, None)
    current = state.state_get(KIND, LAST)
    if current is None or start > current:
        state.state_put(KIND, LAST, start, None, None)
    return appended
