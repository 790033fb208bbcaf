"""The capture host's side of manual events on the JetStream backend: the requests API
nodes put into the cluster (outbox/jetstream_sends.py) appended through capture, the
stream's one writer, in its group commits (:meth:`Capture.submit`).

Runs beside capture on the capture host (and on a standby, whose requests wait for it
to take over, as analytics' do).  A failure here never stops capture: it is logged and
the bucket is watched again a second later.
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

CLEAN_AFTER = 3600.0  # a mark older than this whose request is gone is forgotten
DONE_KEPT = 10_000  # requests this server finished, remembered (their late updates ignored)


class SendServer:
    def __init__(self, settings: Settings, capture: Capture) -> None:
        self.settings = settings
        self.capture = capture
        self._serving: dict[str, asyncio.Future[None]] = {}
        self._done: dict[str, None] = {}  # (insertion-ordered: the oldest go first)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve requests until ``stop`` is set."""
        while not stop.is_set():
            events = events_log(self.settings)
            try:
                await self._watch(events, stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sends_interrupted", error=f"{type(exc).__name__}: {exc}")
            finally:
                for task in self._serving.values():
                    task.cancel()
                self._serving.clear()
                with contextlib.suppress(Exception):
                    await events.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _watch(self, events: JetStreamLog, stop: asyncio.Event) -> None:
        await events.connect()
        bucket = await events.bucket(sends.bucket_of(events))
        watcher = await events.retrying(bucket.watchall)
        asked: set[str] = set()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                update = asyncio.ensure_future(watcher.updates(timeout=None))
                await asyncio.wait([update, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not update.done():
                    update.cancel()
                    break
                entry = update.result()
                if entry is None:  # what the bucket held at the start has been read
                    self._clean(set(asked))
                    continue
                if not entry.value:  # done or withdrawn
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
            stopping.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _serve(self, events: JetStreamLog, request: str, row: dict[str, Any], revision: int) -> None:
        """Take the request, have capture append its event, then delete the request and
        the mark; a step that fails is tried again a second later (a standby's capture
        runs the append once it takes over)."""
        taken = row.get("state") != "asked"
        try:
            while True:
                try:
                    if not taken:
                        if not await sends.take(events, request, row, revision):
                            return  # withdrawn by the API node, which answered that nothing was sent
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

    def _clean(self, asked: set[str]) -> None:
        """Marks and passed-over events of requests no longer in the bucket (a crash
        between deleting a request and its mark): forgotten, in capture's next group."""
        future = self.capture.submit(partial(_clean, asked))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # (best effort)


def _append(request: str, row: dict[str, Any], sink: Sink) -> bool:
    """On capture's thread: append the request's event, unless capture's state says it is
    appended or the request is gone (another capture appended it and deleted it)."""
    assert isinstance(sink, JetStreamSink)
    state = sink.state
    if state.state_get(sends.SERVED, request) is not None:
        return False
    if not sink.run(sends.asked(sink.log, request)):
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
