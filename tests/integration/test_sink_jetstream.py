"""Capture's sink on the JetStream backend (a three-node cluster on loopback) passes the
same sink contract as the SQLite outbox (tests/sink_contract.py), and a group whose
local commit was lost, or a huge transaction cut short, is read again without an event
twice in the stream."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from cdc.ports import Sink
from outbox import store
from outbox.jetstream import Fenced, JetStreamLog
from outbox.jetstream_sink import CHUNK, JetStreamSink
from outbox.store import Router
from outbox.writer import OutboxWriter
from sidecar.natscluster import NatsCluster
from tests.conftest import read_stream
from tests.integration.test_sink_outbox import OutboxBackend
from tests.sink_contract import AT, SinkContract


class JetStreamBackend(OutboxBackend):
    """Events on a stream of the cluster; capture's state (skips, problems) in the file at
    ``path``, read as the SQLite backend reads them."""

    def __init__(self, servers: list[str], local: Path) -> None:
        super().__init__(local)
        self.servers = servers
        self.stream = f"S{uuid.uuid4().hex[:10].upper()}"

    def log(self) -> JetStreamLog:
        return JetStreamLog(self.servers, stream=self.stream, subject=f"s.{self.stream}", timeout=2.0)

    def open(self) -> Sink:
        return JetStreamSink(self.log(), OutboxWriter(store.open_outbox(self.path), Router([])))

    def close(self, sink: Sink) -> None:
        assert isinstance(sink, JetStreamSink)
        sink.close()

    def stored(self) -> list[tuple[int, str | None, dict[str, Any]]]:
        return read_stream(self.servers, self.stream, f"s.{self.stream}")

    def events(self) -> list[tuple[int, str, Any, dict[str, Any], int | None]]:
        return [(seq, b["type"], b["entity_key"], b["data"], b["xid"]) for seq, _, b in self.stored()]


@pytest.fixture
def backend(nats_cluster: NatsCluster, tmp_path: Path) -> JetStreamBackend:
    return JetStreamBackend(nats_cluster.servers, tmp_path / "state.db")


class TestJetStreamSinkContract(SinkContract):
    pass


def add(sink: Sink, xid: int, n: int) -> None:
    for i in range(n):
        data = {"object": "order", "id": i, "record": {"id": i}, "previous": None}
        sink.add("order.created", "order", i, data, AT, "public.orders", "insert", "0/1", xid)


def test_a_group_whose_local_commit_was_lost_is_read_again_without_a_duplicate(backend):
    sink = backend.open()
    add(sink, xid=1, n=3)
    sink.commit("s", 0x10)
    add(sink, xid=2, n=2)
    # the stream took the group, the process died before the local file committed it
    assert isinstance(sink, JetStreamSink)
    sink._send(0x20, "s")
    sink.local.rollback()
    backend.close(sink)

    again = backend.open()
    assert again.checkpoint("s") == 0x10  # the state is committed there: read from there
    add(again, xid=2, n=2)  # transaction 2, read again
    add(again, xid=3, n=1)
    again.commit("s", 0x30)
    backend.close(again)
    assert [(seq, key) for seq, key, _ in backend.stored()] == [
        (1, "1:0"),
        (2, "1:1"),
        (3, "1:2"),
        (4, "2:0"),
        (5, "2:1"),
        (6, "3:0"),
    ]


def test_reading_again_over_several_commits_still_sends_nothing_twice(backend):
    sink = backend.open()
    add(sink, xid=1, n=1)
    sink.commit("s", 0x10)
    add(sink, xid=2, n=2)
    add(sink, xid=3, n=1)
    assert isinstance(sink, JetStreamSink)
    sink._send(0x30, "s")  # in the stream; the local commit lost
    sink.local.rollback()
    backend.close(sink)

    again = backend.open()
    assert again.checkpoint("s") == 0x10
    add(again, xid=2, n=2)
    again.commit("s", 0x20)  # read again in smaller groups this time
    add(again, xid=3, n=1)
    again.commit("s", 0x30)
    add(again, xid=4, n=1)
    again.commit("s", 0x40)
    backend.close(again)
    assert [key for _, key, _ in backend.stored()] == ["1:0", "2:0", "2:1", "3:0", "4:0"]


def test_a_huge_transaction_goes_in_chunks_and_a_cut_one_is_not_sent_twice(backend):
    sink = backend.open()
    add(sink, xid=9, n=2 * CHUNK + 10)  # a chunk is in the stream before the commit
    assert isinstance(sink, JetStreamSink)
    assert sink.pending == 2 * CHUNK + 10 and len(sink._events) == CHUNK + 10
    backend.close(sink)  # died before the commit

    again = backend.open()
    assert again.checkpoint("s") is None
    add(again, xid=9, n=2 * CHUNK + 10)  # the transaction read again from its start
    again.commit("s", 0x99)
    backend.close(again)
    stored = backend.stored()
    assert [key for _, key, _ in stored] == [f"9:{i}" for i in range(2 * CHUNK + 10)]
    assert [seq for seq, _, _ in stored] == list(range(1, 2 * CHUNK + 11))


def test_a_derived_event_of_a_non_ascii_entity_reads_back_after_a_restart(backend):
    sink = backend.open()
    data = {"object": "cart", "id": "café", "record": {"id": "café"}, "previous": None}
    sink.add("cart.abandoned", "cart", "café", data, AT, "public.carts", "derived", "0/2A", None)
    sink.commit("s", 0x2A)
    backend.close(sink)
    again = backend.open()  # reads the stream's end, keys included
    assert again.checkpoint("s") == 0x2A
    add(again, xid=5, n=1)
    again.commit("s", 0x30)
    backend.close(again)
    stored = backend.stored()
    assert [key for _, key, _ in stored] == ["0/2A:cart.abandoned:caf%C3%A9:0", "5:0"]
    assert stored[0][2]["entity_key"] == "café"


def test_a_writer_that_was_taken_over_stays_out_after_its_rollback(backend):
    first = backend.open()
    add(first, xid=1, n=2 * CHUNK)  # a chunk of an open group is in the stream
    assert isinstance(first, JetStreamSink) and first.in_transaction
    second = backend.open()  # a standby takes over the stream's end
    add(second, xid=2, n=1)
    second.commit("s", 0x20)
    with pytest.raises(Fenced):
        first.rollback()  # (its session failed: it reads the end again before going on)
    with pytest.raises(Fenced):
        add(first, xid=3, n=1)
        first.commit("s", 0x30)
    backend.close(second)
    first.local.rollback()
    backend.close(first)
    assert [key for _, key, _ in backend.stored()] == [f"1:{i}" for i in range(CHUNK)] + ["2:0"]
