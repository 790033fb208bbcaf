"""The capture host's server of manual events (sidecar/sends.py) on a real three-node
cluster, appending through a real JetStream sink: a request is taken, appended once and
deleted, its mark forgotten; one whose API node has answered already (past `take_by`)
is withdrawn and never appended; a malformed one is dropped without touching capture;
and nothing is taken while capture does not stream (a standby)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from outbox import jetstream_sends as sends
from outbox.jetstream import JetStreamLog
from outbox.jetstream_sink import JetStreamSink
from sidecar.natscluster import NatsCluster
from sidecar.sends import SendServer
from tests.integration.test_sink_jetstream import JetStreamBackend
from tests.sink_contract import AT
from tests.waiting import wait_until

ROW = {"type": "ops.notice", "data": {"n": 1}, "endpoints": ["ct2"], "occurred_at": AT}


class Capture:
    """Capture's side of the server: work run on the sink at once, in order, each in a
    group commit of its own."""

    def __init__(self, sink: JetStreamSink) -> None:
        self.sink = sink
        self.streaming = threading.Event()
        self.lock = threading.Lock()
        self.ran = 0

    def submit(self, work: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self.lock:
            result = work(self.sink)
            self.sink.commit("s", 0)
            self.ran += 1
        done.set_result(result)
        return done


async def test_requests_are_served_once_while_capture_streams_and_never_past_their_time(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    backend = JetStreamBackend(nats_cluster.servers, tmp_path / "state.db")
    sink = backend.open_on(tmp_path / "capture.db")
    capture = Capture(sink)
    stream = {
        "servers": backend.servers,
        "stream": backend.stream,
        "subject": f"s.{backend.stream}",
        "partitions": 4,
    }
    settings = Settings(outbox={"backend": "jetstream", "jetstream": stream})
    asker = JetStreamLog(backend.servers, stream=backend.stream, subject=f"s.{backend.stream}", partitions=4)
    await asker.connect()
    stop = asyncio.Event()
    server = asyncio.ensure_future(SendServer(settings, capture).run(stop))  # type: ignore[arg-type]
    try:
        await sends.ask(asker, "early", ROW, 30.0)
        await asyncio.sleep(1.0)
        assert capture.ran == 0  # a standby's server takes nothing
        assert await sends.state_of(asker, "early") == "asked"

        await sends.ask(asker, "late", ROW, -1.0)  # its API node answered already
        await sends.ask(asker, "bad", {"type": "ops.notice"}, 30.0)
        capture.streaming.set()
        await until(lambda: "send:early" in names(backend), "the early request appended")
        await until_state(asker, "early", None)
        await until_state(asker, "late", "withdrawn", also_gone=True)
        await until_state(asker, "bad", "withdrawn", also_gone=True)
        await asyncio.sleep(0.5)
        assert names(backend) == ["send:early"]  # once; neither the late nor the bad one
        assert sink.state.state_get(sends.SERVED, "early") is None  # the mark forgotten
    finally:
        stop.set()
        await server
        await asker.close()
        sink.close()


def names(backend: JetStreamBackend) -> list[str]:
    return [event["name"] for _, _, event in backend.stored() if "name" in event]


async def until(check: Callable[[], bool], what: str) -> None:
    await asyncio.to_thread(wait_until, check, 20, what=what)


async def until_state(events: JetStreamLog, request: str, state: str | None, also_gone: bool = False) -> None:
    deadline = time.monotonic() + 20
    while True:
        now = await sends.state_of(events, request)
        if now == state or (also_gone and now is None):
            return
        assert time.monotonic() < deadline, f"{request} is {now}, not {state}"
        await asyncio.sleep(0.05)
