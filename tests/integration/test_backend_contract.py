"""One contract, both outbox backends: what the API and dispatch roles give from a node's
outbox file, whether capture appended to it (SQLite) or to a replicated stream the node
copies (JetStream, on a real three-node cluster): gap-free ids in append order, the
events cursor with type filters, every event delivered once and signed under its
``evt_<id>``, one entity's events in order, dead deliveries replayed under the same
webhook-id (as `ct1-cdc outbox replay --dead` replays them: through the cluster on
JetStream), an API key made or revoked by a command on any host (`ct1-cdc keys`) and an
endpoint disabled or enabled on any host (`ct1-cdc endpoints`) holding on the node.  On
SQLite "any host" is the one host and its file; on JetStream it is another host's file,
shared through the cluster as the commands share it.  (The sink's own contract:
tests/sink_contract.py.)"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api import keys as api_keys
from api.app import BASE, create_app
from config.settings import Settings
from dispatcher.worker import Dispatcher
from outbox import deliveries, endpoints, store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_mirror import Mirror
from outbox.jetstream_shared import ENDPOINTS, KEYS, Shared, share, share_replays
from outbox.jetstream_sink import JetStreamSink
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from sidecar.natscluster import NatsCluster
from tests.integration.test_dispatch import Receiver, settings_for
from tests.sink_contract import AT
from tests.waiting import wait_until

PARTITIONS = 4


class Node:
    """Capture appending, and one node's outbox file that the API and dispatch read."""

    path: Path
    partitions = 0

    def append(self, events: list[tuple[str, int]]) -> None:
        """One group commit of (type, order key) events; back once the node's file has it."""
        raise NotImplementedError

    @contextmanager
    def elsewhere(self, shared: Shared) -> Iterator[sqlite3.Connection]:
        """The outbox file a command changes on a host of its own (``ct1-cdc keys``,
        ``ct1-cdc endpoints``), which then shares ``shared`` as that command does."""
        raise NotImplementedError
        yield

    def replay_dead(self, endpoint: str) -> int:
        """`ct1-cdc outbox replay --dead --endpoint E` as run on the node; how many."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def add(sink: Any, events: list[tuple[str, int]], lsn: int) -> None:
    for n, (etype, key) in enumerate(events):
        data = {
            "object": "order",
            "id": key,
            "record": {"id": key, "n": n},
            "previous": {"status": "pending"},
        }
        sink.add(etype, "order", key, data, AT, "public.orders", "update", "0/1", lsn)
    sink.commit("s", lsn)


class SqliteNode(Node):
    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "outbox.db"
        self.sink = OutboxWriter(store.open_outbox(self.path), Router([Route("ct2", ("*",))]))
        self.lsn = 0

    def append(self, events: list[tuple[str, int]]) -> None:
        self.lsn += 1
        add(self.sink, events, self.lsn)

    @contextmanager
    def elsewhere(self, shared: Shared) -> Iterator[sqlite3.Connection]:
        conn = store.open_outbox(self.path)  # one host: the commands change the file itself
        try:
            yield conn
        finally:
            conn.close()

    def replay_dead(self, endpoint: str) -> int:
        with store.connect(self.path) as conn:
            return deliveries.replay_dead(conn, endpoint=endpoint, since=0, now=0)

    def close(self) -> None:
        self.sink.close()


class JetStreamNode(Node):
    partitions = PARTITIONS

    def __init__(self, tmp: Path, cluster: NatsCluster) -> None:
        name = f"C{uuid.uuid4().hex[:8].upper()}"
        self.path = tmp / "node.db"

        def log() -> JetStreamLog:
            return JetStreamLog(
                cluster.servers, stream=name, subject=f"c.{name.lower()}", partitions=PARTITIONS
            )

        self.log = log
        self.other_host = tmp / "elsewhere.db"
        OutboxWriter(store.open_outbox(self.other_host), Router([Route("ct2", ("*",))])).close()
        self.sink = JetStreamSink(log(), OutboxWriter(store.open_outbox(tmp / "capture.db"), Router([])))
        self.mirror = Mirror(log(), lambda: store.open_outbox(self.path), Router([Route("ct2", ("*",))]))
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()
        self.lsn = 0

    def _copy(self) -> None:
        try:
            self.mirror.run(self.stop)
        except BaseException as exc:
            self.errors.append(exc)

    def append(self, events: list[tuple[str, int]]) -> None:
        self.lsn += 1
        add(self.sink, events, self.lsn)
        end = self.sink.last_event_id
        wait_until(
            lambda: self.errors or self.mirror.last_id >= end, 30, what=f"the node's copy to reach {end}"
        )
        assert not self.errors, self.errors

    @contextmanager
    def elsewhere(self, shared: Shared) -> Iterator[sqlite3.Connection]:
        conn = store.open_outbox(self.other_host)
        try:
            yield conn
            share(self.log(), conn, shared)  # what the command does after its change
        finally:
            conn.close()

    def replay_dead(self, endpoint: str) -> int:
        """Into the cluster, as the command does on this backend; back once the node's
        copy has made the deliveries due again."""
        with store.connect(self.path) as conn:
            rows = deliveries.replayable_dead(conn, endpoint=endpoint, since=0)
        share_replays(self.log(), rows)

        def due() -> bool:
            with store.connect(self.path, readonly=True) as conn:
                query = "SELECT count(*) FROM deliveries WHERE status = 'pending' AND replayed = 1"
                return int(conn.execute(query).fetchone()[0]) == len(rows)

        wait_until(lambda: self.errors or due(), 30, what="the replay in the node's copy")
        assert not self.errors, self.errors
        return len(rows)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.sink.close()


@pytest.fixture(params=["sqlite", "jetstream"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    made: Node
    if request.param == "sqlite":
        made = SqliteNode(tmp_path)
    else:
        made = JetStreamNode(tmp_path, request.getfixturevalue("nats_cluster"))
    try:
        yield made
    finally:
        made.close()


def test_ids_are_gap_free_in_append_order_and_the_cursor_reads_each_event_once(node: Node) -> None:
    groups = [
        [("order.updated", k) for k in range(5)],
        [("order.status_changed", 9)],
        [("order.updated", k % 3) for k in range(7)],
    ]
    for group in groups:
        node.append(group)
    expected = [e for group in groups for e in group]
    with store.connect(node.path, readonly=True) as conn:
        seen, after = [], 0
        while True:
            rows, after = store.read_events(conn, after=after, types=(), limit=4)
            if not rows:
                break
            seen += rows
        assert [r[0] for r in seen] == list(range(1, 14))
        assert [(r[1], json.loads(r[3])["id"]) for r in seen] == expected
        # a filter's reader skips what does not match and misses nothing after
        rows, got_to = store.read_events(conn, after=0, types=("order.status_*",), limit=10)
        assert [r[0] for r in rows] == [6] and got_to == 13
        assert store.get_event(conn, 13) is not None and store.get_event(conn, 14) is None


async def run_dispatcher(node: Node, url: str, done: Callable[[], bool], **dispatcher: Any) -> Dispatcher:
    settings = settings_for(node.path.parent, url, **dispatcher)
    settings.outbox.path = str(node.path)
    worker = Dispatcher(settings, partitions=node.partitions)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(30):
            if node.partitions:  # (as the only dispatch node: every partition its lease)
                while not worker.started.is_set():
                    await asyncio.sleep(0.02)
                await asyncio.wrap_future(worker.assign(frozenset(range(node.partitions)), {}))
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    return worker


async def test_every_event_is_delivered_once_signed_under_its_id_each_order_in_order(node: Node) -> None:
    events = [("order.updated", k % 4) for k in range(40)]
    node.append(events[:25])
    node.append(events[25:])
    async with Receiver() as rx:
        await run_dispatcher(node, rx.url, lambda: len(rx.received) >= 40)
        await asyncio.sleep(0.2)
    assert sorted(r.headers["webhook-id"] for r in rx.received) == sorted(f"evt_{i}" for i in range(1, 41))
    for key in range(4):
        ids = [r.envelope["id"] for r in rx.received if r.envelope["data"]["id"] == key]
        assert ids == [i + 1 for i, (_, k) in enumerate(events) if k == key]
    with store.connect(node.path, readonly=True) as conn:
        assert store.stats(conn)["deliveries"] == {"ct2": {"delivered": 40}}


async def test_dead_deliveries_are_replayed_under_the_same_webhook_id(node: Node) -> None:
    refusing = {"on": True}

    async def order_two_refused(request: web.Request, call: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        return web.Response(status=500) if refusing["on"] and body["data"]["id"] == 2 else web.Response()

    node.append([("order.updated", k) for k in range(4)])
    async with Receiver(order_two_refused) as rx:
        with store.connect(node.path, readonly=True) as conn:

            def dead() -> bool:
                return bool(deliveries.list_deliveries(conn, status="dead"))

            await run_dispatcher(
                node, rx.url, lambda: len(rx.received) >= 3 and dead(), retry_schedule=[0, 0.05]
            )
            assert [
                (d["event_id"], d["attempts"]) for d in deliveries.list_deliveries(conn, status="dead")
            ] == [(3, 2)]
        refusing["on"] = False
        assert node.replay_dead("ct2") == 1
        await run_dispatcher(node, rx.url, lambda: len(rx.received) >= 4)
    assert [r.headers["webhook-id"] for r in rx.received if r.envelope["data"]["id"] == 2] == ["evt_3"]
    with store.connect(node.path, readonly=True) as conn:
        assert store.stats(conn)["deliveries"] == {"ct2": {"delivered": 4}}


async def test_a_key_made_on_any_host_serves_the_node_until_it_is_revoked_there(node: Node) -> None:
    node.append([("order.updated", 1), ("order.updated", 2)])
    with node.elsewhere(KEYS) as conn:
        made = api_keys.create(conn, "ct3", [api_keys.EXPORT], [])
    client = TestClient(TestServer(create_app(Settings(outbox={"path": str(node.path)}))))
    await client.start_server()
    try:

        async def status() -> int:
            resp = await client.get(f"{BASE}/events", headers={"Authorization": f"Bearer {made.key}"})
            if resp.status == 200:
                assert [e["id"] for e in (await resp.json())["data"]] == [1, 2]
            return resp.status

        await until(status, 200, "the key made elsewhere to be taken")
        with node.elsewhere(KEYS) as conn:
            api_keys.revoke(conn, made.id)
        await until(status, 401, "the key revoked elsewhere to be refused")
    finally:
        await client.close()


async def until(ask: Callable[[], Any], wanted: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = await ask()
        if got == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"waited {timeout} s for {what}: got {got!r}, not {wanted!r}")


async def test_an_endpoint_disabled_on_any_host_holds_the_node_s_deliveries_until_enabled(
    node: Node,
) -> None:
    def state() -> str:
        with store.connect(node.path, readonly=True) as conn:
            return endpoints.state_of(conn, "ct2").state

    with node.elsewhere(ENDPOINTS) as conn:
        assert endpoints.set_state(conn, "ct2", "disabled", time.time())
    wait_until(lambda: state() == "disabled", 30, what="the node to see ct2 disabled")
    node.append([("order.updated", k) for k in range(3)])
    async with Receiver() as rx:
        held = asyncio.get_running_loop().time() + 1.5
        await run_dispatcher(node, rx.url, lambda: asyncio.get_running_loop().time() > held)
        assert rx.received == []  # a second and a half of a running dispatcher: nothing sent
        with node.elsewhere(ENDPOINTS) as conn:
            assert endpoints.set_state(conn, "ct2", "active", time.time() + 0.01)
        await run_dispatcher(node, rx.url, lambda: len(rx.received) >= 3)
    assert sorted(r.headers["webhook-id"] for r in rx.received) == ["evt_1", "evt_2", "evt_3"]
    assert state() == "active"
