"""An API or dispatch node's copy of the events stream (outbox/jetstream_mirror.py), on a
real three-node cluster: the copy gives each event the stream's sequence, goes on where
its file ends, refuses a file that is not a copy of the stream, and stops at once."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from outbox import store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_mirror import Mirror, MirrorError
from outbox.jetstream_sink import LoopThread
from outbox.store import Router
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


def run_until(mirror: Mirror, names: int) -> None:
    """Run the copy in a thread until it holds ``names`` events, then stop it."""
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
        wait_until(lambda: errors or mirror.last_id >= names, 30, what=f"{names} events copied")
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
