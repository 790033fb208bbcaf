"""An API or dispatch node's copy of the events stream (outbox/jetstream_mirror.py), on a
real three-node cluster: the copy gives each event the stream's sequence, goes on where
its file ends, refuses a file that is not a copy of the stream, and stops at once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from common.jsontext import loads
from outbox import deliveries, endpoints, store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_mirror import STATES_SECONDS, Mirror, MirrorError
from outbox.jetstream_shared import DELIVERIES, ENDPOINTS, SharedDeliveries, share
from outbox.jetstream_sink import LoopThread
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from sidecar.natscluster import NatsCluster
from tests.sink_contract import AT
from tests.waiting import wait_until


class Stream:
    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.name = f"M{uuid.uuid4().hex[:10].upper()}"

    def log(self, timeout: float = 2.0) -> JetStreamLog:
        return JetStreamLog(
            self.servers, stream=self.name, subject=f"m.{self.name}", partitions=4, timeout=timeout
        )

    def append(self, names: list[str]) -> None:
        """Events as capture stores them (one group)."""
        from common.jsontext import dumps

        loop, log = LoopThread(), self.log()
        try:
            loop.run(log.connect())
            loop.run(log.ensure_stream())
            loop.run(log.adopt())
            body = [
                dumps(
                    {
                        "type": "customer.created",
                        "object": "customer",
                        "entity_key": name,
                        "occurred_at": AT,
                        "data": {
                            "object": "customer",
                            "id": name,
                            "record": {"name": name},
                            "previous": None,
                        },
                        "source_table": "public.users",
                        "op": "insert",
                        "lsn": "0/1",
                        "xid": 7,
                        "created_at": 0.0,
                    }
                )
                for name in names
            ]
            loop.run(
                log.append_whole(
                    [(f"{name}:0", b, i % 4) for i, (name, b) in enumerate(zip(names, body, strict=True))], 1
                )
            )
            loop.run(log.close())
        finally:
            loop.stop()


@pytest.fixture
def stream(nats_cluster: NatsCluster) -> Stream:
    return Stream(nats_cluster.servers)


def mirror_of(stream: Stream, path: Path, timeout: float = 2.0) -> Mirror:
    return Mirror(stream.log(timeout), lambda: store.open_outbox(path), Router([]))


def run_until(mirror: Mirror, names: int, timeout: float = 30, what: str = "") -> None:
    """Run the copy in a thread until it holds ``names`` events (or fails: its error is
    raised here), then stop it."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            mirror.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    try:
        wait_until(lambda: errors or mirror.last_id >= names, timeout, what=what or f"{names} events copied")
    finally:
        stop.set()
        thread.join(timeout=10)
    if errors:
        raise errors[0]


def names_in(path: Path) -> list[tuple[int, str]]:
    conn = store.connect(path, readonly=True)
    try:
        return [(i, k) for i, k in conn.execute("SELECT id, entity_key FROM events ORDER BY id")]
    finally:
        conn.close()


def test_the_copy_gives_each_event_the_streams_sequence_and_goes_on_where_it_ended(stream, tmp_path):
    stream.append(["a", "b", "c"])
    run_until(mirror_of(stream, tmp_path / "n.db"), 3)
    stream.append(["d", "e"])
    run_until(mirror_of(stream, tmp_path / "n.db"), 5)
    assert names_in(tmp_path / "n.db") == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]


def test_an_outbox_that_is_not_a_copy_of_the_stream_is_refused(stream, tmp_path):
    stream.append(["a", "b"])
    writer = OutboxWriter(store.open_outbox(tmp_path / "sqlite.db"), Router([]))  # the SQLite backend's
    writer.add("customer.created", "customer", "x", {"id": "x"}, AT, None, "insert", "0/1", 1)
    writer.commit(None)
    writer.close()
    with pytest.raises(MirrorError, match="not a copy of stream"):
        run_until(mirror_of(stream, tmp_path / "sqlite.db"), 2)
    assert names_in(tmp_path / "sqlite.db") == [(1, "x")]  # nothing written


def test_an_event_appended_to_the_copy_by_something_else_stops_it_now_and_after_a_restart(stream, tmp_path):
    stream.append(["a", "b"])
    run_until(mirror_of(stream, tmp_path / "n.db"), 2)
    writer = OutboxWriter(store.open_outbox(tmp_path / "n.db"), Router([]))  # e.g. a local event
    writer.add("ct1.gap", "gap", None, {}, AT, None, "derived", "0/2", None)
    writer.commit(None)
    writer.close()
    stream.append(["c"])
    for _ in range(2):  # running, and started again: never a shifted id
        with pytest.raises(MirrorError, match="something else appended"):
            run_until(mirror_of(stream, tmp_path / "n.db"), 3)
    assert [k for _, k in names_in(tmp_path / "n.db")] == ["a", "b", None]


def test_a_copy_that_cannot_reach_the_cluster_stops_at_once_when_told(tmp_path):
    mirror = Mirror(
        JetStreamLog(["nats://127.0.0.1:9"], stream="X", subject="x", timeout=5.0),
        lambda: store.open_outbox(tmp_path / "n.db"),
        Router([]),
    )
    stop = threading.Event()
    thread = threading.Thread(target=lambda: mirror.run(stop))
    thread.start()
    time.sleep(0.5)
    stopped = time.monotonic()
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 2  # not the 15 s connecting may take


# -- endpoint states shared through the cluster ---------------------------------------------


def disabled_elsewhere(stream: Stream, path: Path) -> None:
    """``ct1-cdc endpoints disable ct2`` on another host: its file, then the bucket."""
    OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))])).close()
    conn = store.open_outbox(path)
    try:
        assert endpoints.set_state(conn, "ct2", "disabled", time.time())
        share(stream.log(), conn, ENDPOINTS)
    finally:
        conn.close()


def state_in(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        with store.connect(path, readonly=True) as conn:
            row = conn.execute("SELECT state FROM endpoints WHERE name = 'ct2'").fetchone()
    except sqlite3.OperationalError:  # (the copy is making the file)
        return None
    return None if row is None else str(row[0])


def test_an_endpoint_disabled_on_another_host_before_a_node_starts_is_disabled_on_it(stream, tmp_path):
    """A node's file registers its endpoints when it is made: that is no state written, and
    must not outrank one an operator wrote anywhere before (reproduced first: the node's
    registration time was newer, and the endpoint stayed active on it)."""
    disabled_elsewhere(stream, tmp_path / "elsewhere.db")
    time.sleep(0.05)
    node = tmp_path / "node.db"
    mirror = Mirror(stream.log(), lambda: store.open_outbox(node), Router([Route("ct2", ("*",))]))
    stop = threading.Event()
    thread = threading.Thread(target=mirror.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: state_in(node) == "disabled", 15, last=True), state_in(node)
    finally:
        stop.set()
        thread.join(timeout=10)


def test_a_dispatch_node_shares_only_the_endpoint_states_it_changed(stream, tmp_path):
    """A dispatch node puts into the bucket what its dispatcher changes, not what its file
    held when it started (reproduced first: a node starting put its freshly registered
    "active" there, over an operator's "disabled", for every node started after it)."""
    disabled_elsewhere(stream, tmp_path / "elsewhere.db")
    node = tmp_path / "node.db"
    writer = OutboxWriter(store.open_outbox(node), Router([Route("ct2", ("*",))]))
    mirror = Mirror(stream.log(), lambda: store.open_outbox(node), Router([]))

    async def share_for_a_moment(change: bool) -> str:
        await mirror.log.connect()
        try:
            sharing = asyncio.ensure_future(mirror._share_states(writer))
            await asyncio.sleep(0.3)
            if change:  # this node's dispatcher pauses it
                state = endpoints.state_of(writer.conn, "ct2")
                state.state, state.paused_until, state.updated_at = "paused", time.time() + 60, time.time()
                endpoints.save_state(writer.conn, state)
                await asyncio.sleep(STATES_SECONDS + 0.5)
            sharing.cancel()
            bucket = await mirror.log.bucket(ENDPOINTS.bucket(mirror.log))
            return str(loads((await bucket.get("ct2")).value)["state"])
        finally:
            await mirror.log.close()

    try:
        assert asyncio.run(share_for_a_moment(change=False)) == "disabled"
        assert asyncio.run(share_for_a_moment(change=True)) == "paused"
    finally:
        writer.close()


# -- dead deliveries and replays shared through the cluster ----------------------------------


def test_a_dead_delivery_and_its_replay_go_through_every_node_s_file_until_delivered(stream, tmp_path):
    """Two nodes' files, each following ``<stream>_DELIVERIES``: the dispatch node's dead
    delivery is dead on the other; a replay made due on both; delivered by the holder, it
    is delivered on the other; dead again after the replay, dead again on the other."""
    files = {}
    for name in ("holder", "other"):  # each node's copy: the same event 1
        writer = OutboxWriter(store.open_outbox(tmp_path / f"{name}.db"), Router([Route("ct2", ("*",))]))
        writer.add("order.updated", "order", 1, {"id": 1}, AT, "public.orders", "update", "0/1", 1)
        writer.commit(None)
        files[name] = writer.conn
    holder, other = SharedDeliveries(), SharedDeliveries()

    def statuses(name: str) -> list[tuple[int, str, int]]:
        rows = deliveries.list_deliveries(files[name], endpoint="ct2")
        return [(r["event_id"], r["status"], r["attempts"]) for r in rows]

    async def scenario() -> None:
        log = stream.log()
        await log.connect()
        follows = [
            asyncio.ensure_future(holder.follow(log, files["holder"])),
            asyncio.ensure_future(other.follow(log, files["other"])),
        ]

        async def until(check: Callable[[], bool], what: str, publishing: bool = False) -> None:
            """Wait for ``check``; ``publishing``: the holder's rounds go on meanwhile (a put
            made at a revision its follow had not caught up with is made at the next)."""
            deadline = time.monotonic() + 15
            while True:
                if publishing:
                    await holder.publish(log, files["holder"])
                if check():
                    return
                assert time.monotonic() < deadline, f"{what}: {statuses('holder')} {statuses('other')}"
                await asyncio.sleep(0.05)

        def settle(status: str, attempts: int) -> None:  # as the holder's dispatcher would
            files["holder"].execute(
                "INSERT INTO deliveries (endpoint, event_id, entity, status, attempts, last_status)"
                " VALUES ('ct2', 1, 'order:1', ?, ?, 500) ON CONFLICT (endpoint, event_id)"
                " DO UPDATE SET status = excluded.status, attempts = excluded.attempts",
                (status, attempts),
            )

        try:
            await until(lambda: holder.synced and other.synced, "both follows to read the bucket")
            settle("dead", 3)
            await until(lambda: statuses("other") == [(1, "dead", 3)], "dead on the other node", True)
            await holder.publish(log, files["holder"])  # nothing new: no second put
            await DELIVERIES.replayed(log, [("ct2", 1, "order:1")])  # `outbox replay --dead`, anywhere
            for name in files:
                await until(lambda name=name: statuses(name) == [(1, "pending", 0)], f"due again on {name}")
            # a partition's take removed the holder's pending copy before it was sent: due again
            files["holder"].execute("DELETE FROM deliveries")
            await holder.publish(log, files["holder"])
            assert statuses("holder") == [(1, "pending", 0)]
            settle("delivered", 1)
            await until(
                lambda: statuses("other") == [(1, "delivered", 0)], "delivered on the other node", True
            )
            await DELIVERIES.replayed(log, [("ct2", 1, "order:1")])  # replayed again later ...
            await until(lambda: statuses("holder") == [(1, "pending", 0)], "due again on the holder")
            settle("dead", 3)  # ... and given up on again
            await until(lambda: statuses("other") == [(1, "dead", 3)], "dead again on the other node", True)
            settle("delivered", 4)  # delivered after all (`replay --from`, a take sending it again)
            await until(lambda: statuses("other") == [(1, "delivered", 3)], "delivered after dead", True)
        finally:
            for task in follows:
                task.cancel()
            await log.close()

    try:
        asyncio.run(scenario())
    finally:
        for conn in files.values():
            conn.close()


def test_a_shared_delivery_of_an_event_the_copy_has_not_yet_waits_for_it(stream, tmp_path):
    """The bucket names deliveries of any event of the stream; a node whose copy is behind
    (new, or copying a backlog) applies each once the event arrives, and goes on following
    (reproduced first on a file with its foreign keys: the row was refused and the follow
    ended; a node's copy took the row without its event)."""
    conn = store.open_outbox(tmp_path / "behind.db")
    shared = SharedDeliveries()

    async def scenario() -> None:
        log = stream.log()
        await log.connect()
        follow = asyncio.ensure_future(shared.follow(log, conn))
        try:
            await DELIVERIES.replayed(log, [("ct2", 1, "order:1")])
            deadline = time.monotonic() + 15
            while "ct2.1" not in shared.known:
                assert time.monotonic() < deadline and not follow.done(), follow
                await asyncio.sleep(0.05)
            assert not follow.done() and conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
        finally:
            follow.cancel()
            await log.close()

    try:
        asyncio.run(scenario())
        writer = OutboxWriter(conn, Router([Route("ct2", ("*",))]))
        writer.add("order.updated", "order", 1, {"id": 1}, AT, "public.orders", "update", "0/1", 1)
        writer.commit(None)
        shared.caught_up(conn)  # (the copy calls it after each batch)
        assert [(d["event_id"], d["status"]) for d in deliveries.list_deliveries(conn)] == [(1, "pending")]
    finally:
        conn.close()


def test_an_endpoint_command_shares_only_the_endpoint_it_changed(stream, tmp_path):
    """`ct1-cdc endpoints disable ct2` on a host whose file is not kept current puts ct2
    alone: its other endpoints' old rows would land over newer states (reproduced first)."""
    disabled_elsewhere(stream, tmp_path / "first.db")  # ct2 disabled, on one host
    stale = tmp_path / "stale.db"
    OutboxWriter(store.open_outbox(stale), Router([Route("ct2", ("*",)), Route("ct3", ("*",))])).close()
    conn = store.open_outbox(stale)
    try:
        assert endpoints.set_state(conn, "ct3", "disabled", time.time())
        share(stream.log(), conn, ENDPOINTS, only="ct3")
    finally:
        conn.close()

    async def bucket_states() -> dict[str, str]:
        log = stream.log()
        await log.connect()
        try:
            bucket = await log.bucket(ENDPOINTS.bucket(log))
            # (by key: nats-py's keys() may answer "no keys" while its consumer starts)
            return {k: loads((await bucket.get(k)).value)["state"] for k in ("ct2", "ct3")}
        finally:
            await log.close()

    assert asyncio.run(bucket_states()) == {"ct2": "disabled", "ct3": "disabled"}


def test_a_node_is_ready_only_once_its_file_holds_the_keys_and_states_made_before_it_started(
    stream, tmp_path
):
    """An API node said it had started while its copy had not yet read the keys' bucket,
    and refused a key made on another host before it started with 401 (seen in CI): the
    copy is ready only once both buckets' contents at its start are in its file."""
    from outbox import keys
    from outbox.jetstream_shared import KEYS

    disabled_elsewhere(stream, tmp_path / "elsewhere.db")
    elsewhere = store.open_outbox(tmp_path / "elsewhere.db")
    try:
        for n in range(50):  # (a bucket of some size: reading it takes a moment)
            keys.insert(
                elsewhere,
                key_id=f"key{n}",
                name=f"k{n}",
                key_hash=f"hash{n}",
                prefix="ct1_x",
                permissions=["core_transaction_1_export"],
                allow_ips=[],
                created_at=time.time(),
            )
        share(stream.log(), elsewhere, KEYS)
    finally:
        elsewhere.close()
    for attempt in range(3):
        node = tmp_path / f"node{attempt}.db"
        mirror = Mirror(
            stream.log(), lambda node=node: store.open_outbox(node), Router([Route("ct2", ("*",))])
        )
        stop = threading.Event()
        thread = threading.Thread(target=mirror.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert mirror.ready.wait(15)
            with store.connect(node, readonly=True) as conn:
                assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 50
                assert keys.find(conn, "hash49") is not None
            assert state_in(node) == "disabled"
        finally:
            stop.set()
            thread.join(timeout=10)


class BrokenLeases:
    """A dispatch node's leases that fail a moment after they start (the copy has caught up)."""

    rewinds = None
    node = "broken"

    def run_thread(self, stop: threading.Event) -> None:
        time.sleep(1.0)
        raise RuntimeError("the leases broke")


def test_a_dispatch_node_whose_leases_fail_stops_with_their_error_while_the_stream_is_quiet(stream, tmp_path):
    """Seen in a run: a dispatch node's leases failed as it joined, and the node went on
    for good, holding no partition and saying nothing (the copy looked at the failure only
    when the stream brought an event)."""
    stream.append(["a"])
    mirror = Mirror(
        stream.log(),
        lambda: store.open_outbox(tmp_path / "n.db"),
        Router([]),
        leases=BrokenLeases(),  # type: ignore[arg-type]
    )
    with pytest.raises(Exception, match="the leases broke"):
        run_until(mirror, 10**9, 15, what="the copy stopping with the leases' error")
