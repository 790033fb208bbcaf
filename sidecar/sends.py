"""The capture host's side of manual events on the JetStream backend: the requests API
nodes make in the cluster (outbox/jetstream_sends.py) appended through capture, the
stream's one writer, in its group commits (:meth:`Capture.submit`).

It serves only while its capture streams the slot (a standby takes nothing: the active
capture does), and a failure here never stops capture: it is logged and the bucket is
watched again a second later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import Any

import structlog

from cdc.capture import Capture
from cdc.ports import Sink
from common.jsontext import loads
from config.settings import Settings
from outbox import jetstream_sends as sends
from outbox.jetstream import JetStreamLog, events_log
from outbox.jetstream_sink import JetStreamSink

log = structlog.get_logger("ct1_cdc.sends")

CLEAN_AFTER = 3600.0  # marks of requests gone, and markers of requests done, older than this go
DONE_KEPT = 10_000  # requests this server finished, remembered (their late updates ignored)


class SendServer:
    def __init__(self, settings: Settings, capture: Capture) -> None:
        self.settings = settings
        self.capture = capture
        self._serving: dict[str, asyncio.Future[None]] = {}
        self._done: dict[str, None] = {}  # (insertion-ordered: the oldest go first)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve requests while capture streams, until ``stop`` is set."""
        while not stop.is_set():
            if not self.capture.streaming.is_set():
                await _wait(stop, 0.2)
                continue
            events = events_log(self.settings)
            try:
                await self._watch(events, stop)
            except Exception as exc:
                log.warning("sends_interrupted", error=f"{type(exc).__name__}: {exc}")
                await _wait(stop, 1.0)
            finally:
                for task in self._serving.values():
                    task.cancel()
                self._serving.clear()
                with contextlib.suppress(Exception):
                    await events.close()

    async def _watch(self, events: JetStreamLog, stop: asyncio.Event) -> None:
        """Serve each request the bucket shows, until ``stop`` or capture stops streaming."""
        await events.connect()
        bucket = await events.bucket(sends.bucket_of(events))
        watcher = await events.retrying(bucket.watchall)
        asked: set[str] = set()
        update: asyncio.Future[Any] | None = None
        try:
            while not stop.is_set() and self.capture.streaming.is_set():
                if update is None:
                    update = asyncio.ensure_future(watcher.updates(timeout=None))
                await asyncio.wait([update], timeout=0.2)
                if not update.done():
                    continue
                entry, update = update.result(), None
                if entry is None:  # what the bucket held at the start has been read
                    await self._clean(events, set(asked))
                    continue
                if not entry.value:  # done (or its marker purged)
                    asked.discard(entry.key)
                    continue
                asked.add(entry.key)
                if entry.key in self._serving or entry.key in self._done:
                    continue  # (our own "taken", or an update of one already served)
                task = asyncio.ensure_future(
                    self._serve(events, entry.key, loads(entry.value), entry.revision)
                )
                self._serving[entry.key] = task
        finally:
            if update is not None:
                update.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _serve(self, events: JetStreamLog, request: str, row: dict[str, Any], revision: int) -> None:
        """Take the request, have capture append its event, then delete the request and
        the mark; a step that fails is tried again a second later."""
        try:
            state = row.get("state") if isinstance(row, dict) else None
            why = None if state == "withdrawn" else sends.malformed(row)
            if state == "withdrawn" or why is not None:  # (its API node answered: not sent)
                if why is not None:
                    log.warning("manual_event_dropped", request=request, reason=why)
                await sends.forget(events, request, revision)
                return
            taken = row["state"] == "taken"
            while True:
                try:
                    if not taken:
                        if time.time() > float(row["take_by"]):  # its API node has answered
                            await sends.withdraw(events, request, revision)  # (not ours to take now)
                            log.warning("manual_event_dropped", request=request, reason="not taken in time")
                            return
                        if not await sends.take(events, request, row, revision):
                            return  # withdrawn by its API node, which answered that nothing was sent
                        taken = True
                    appended = await asyncio.wrap_future(self.capture.submit(partial(_append, request, row)))
                    await sends.done(events, request)
                    await asyncio.wrap_future(self.capture.submit(partial(_forget, request)))
                    self._finished(request)
                    log.info("manual_event_appended" if appended else "manual_event_seen", request=request)
                    return
                except Exception as exc:
                    log.warning("manual_event_retry", request=request, error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(1.0)
        finally:
            self._serving.pop(request, None)

    def _finished(self, request: str) -> None:
        self._done[request] = None
        while len(self._done) > DONE_KEPT:
            del self._done[next(iter(self._done))]

    async def _clean(self, events: JetStreamLog, asked: set[str]) -> None:
        """Marks and passed-over events of requests no longer in the bucket (a crash
        between deleting a request and its mark), in capture's next group; markers of
        requests done long ago (best effort)."""
        self.capture.submit(partial(_clean, asked)).add_done_callback(_ignored)
        with contextlib.suppress(Exception):
            await sends.purge_deleted(events, CLEAN_AFTER)


def _append(request: str, row: dict[str, Any], sink: Sink) -> bool:
    """On capture's thread: append the request's event, unless capture's state says it is
    appended (by this capture or the one before it)."""
    state = sink.state
    if state.state_get(sends.SERVED, request) is not None:
        return False
    sink.add(
        row["type"],
        "manual",
        None,
        row["data"],
        row["occurred_at"],
        None,
        "manual",
        None,
        None,
        sends.name_of(request),
        row["endpoints"],
    )
    state.state_put(sends.SERVED, request, request, None, time.time())
    return True


def _forget(request: str, sink: Sink) -> None:
    sink.state.state_delete(sends.SERVED, request)


def _clean(asked: set[str], sink: Sink) -> None:
    assert isinstance(sink, JetStreamSink)
    sink.sends_gone(asked)
    for request in sink.state.state_due(sends.SERVED, time.time() - CLEAN_AFTER, 1000):
        if request not in asked:
            sink.state.state_delete(sends.SERVED, request)


def _ignored(future: Any) -> None:
    if not future.cancelled():
        future.exception()  # (retrieved: a refusal is not worth a warning)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
