"""Capture's sink on the JetStream backend (a three-node cluster on loopback) passes the
same sink contract as the SQLite outbox (tests/sink_contract.py), and a group whose
local commit was lost, or a huge transaction cut short, is read again without an event
twice in the stream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from cdc.ports import Sink
from outbox import jetstream, jetstream_sink, source_state, store
from outbox import jetstream_sends as sends
from outbox.jetstream import Fenced, JetStreamLog, Moved
from outbox.jetstream_shared import share_skip
from outbox.jetstream_sink import CHUNK, STATE_CHUNK, JetStreamSink, LoopThread, state_log
from outbox.store import Router
from outbox.writer import OutboxWriter
from sidecar.natscluster import NatsCluster
from sidecar.sends import _append as served
from tests.conftest import read_stream
from tests.integration.test_sink_outbox import OutboxBackend
from tests.sink_contract import AT, SinkContract

PARTITIONS = 4


class JetStreamBackend(OutboxBackend):
    """Events on a stream of the cluster; capture's state (skips, problems) in the file at
    ``path``, read as the SQLite backend reads them."""

    def __init__(self, servers: list[str], local: Path) -> None:
        super().__init__(local)
        self.servers = servers
        self.stream = f"S{uuid.uuid4().hex[:10].upper()}"

    def log(self) -> JetStreamLog:
        return JetStreamLog(
            self.servers, stream=self.stream, subject=f"s.{self.stream}", partitions=PARTITIONS, timeout=2.0
        )

    def open(self) -> Sink:
        return self.open_on(self.path)

    def open_on(self, local: Path) -> JetStreamSink:
        """A sink whose local copy is the file at ``local`` (another host's, say)."""
        return JetStreamSink(self.log(), OutboxWriter(store.open_outbox(local), Router([])))

    def close(self, sink: Sink) -> None:
        assert isinstance(sink, JetStreamSink)
        sink.close()

    def stored(self) -> list[tuple[int, str | None, dict[str, Any]]]:
        return read_stream(self.servers, self.stream, f"s.{self.stream}", partitions=PARTITIONS)

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


# -- capture's state on the state stream: another host resumes with it -------------------------


def cart(sink: JetStreamSink, key: str, deadline: float) -> None:
    sink.state.state_put("cart", key, {"key": key, "deadline": deadline}, "customer-1", deadline)


def test_another_host_resumes_with_the_state_from_the_stream_not_from_its_own_disk(backend, tmp_path):
    first = backend.open_on(tmp_path / "host-a.db")
    add(first, xid=1, n=2)
    first.shadow_put("public.orders", "1", {"status": "paid"})
    first.shadow_put("public.orders", "2", {"status": "new"})
    cart(first, "c1", 100.0)
    first.commit("s", 0x10)
    first.shadow_delete("public.orders", "2")
    first.shadow_put("public.orders", "1", {"status": "shipped"})
    cart(first, "c2", 50.0)
    first.state.state_delete("cart", "c1")
    first.commit("s", 0x20)
    first.close()

    second = backend.open_on(tmp_path / "host-b.db")  # a new host: an empty file
    assert second.checkpoint("s") == 0x20
    assert second.shadow_get("public.orders", "1") == {"status": "shipped"}
    assert second.shadow_get("public.orders", "2") is None
    assert second.state.state_get("cart", "c1") is None
    assert second.state.state_due("cart", 60.0, 10) == [{"key": "c2", "deadline": 50.0}]
    assert second.state.state_by_ref("cart", "customer-1") == [{"key": "c2", "deadline": 50.0}]
    add(second, xid=3, n=1)
    second.commit("s", 0x30)
    second.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "1:1", "3:0"]


def test_state_changes_of_a_group_never_committed_are_void_for_the_next_writer(backend, tmp_path):
    first = backend.open_on(tmp_path / "host-a.db")
    first.shadow_put("public.orders", "1", {"status": "new"})
    first.commit("s", 0x10)
    for i in range(STATE_CHUNK + 5):  # a huge transaction: a chunk of its changes is sent
        first.shadow_put("public.orders", str(i), {"status": "huge"})
    assert first._state_open
    first.close()  # died before its commit

    second = backend.open_on(tmp_path / "host-b.db")
    assert second.checkpoint("s") == 0x10
    assert second.shadow_get("public.orders", "1") == {"status": "new"}
    assert second.shadow_get("public.orders", "7") is None
    second.shadow_put("public.orders", "2", {"status": "paid"})
    second.commit("s", 0x20)
    second.close()

    third = backend.open_on(tmp_path / "host-c.db")  # folds the void chunk and what followed
    assert third.checkpoint("s") == 0x20
    assert third.shadow_get("public.orders", "1") == {"status": "new"}
    assert third.shadow_get("public.orders", "2") == {"status": "paid"}
    assert third.shadow_get("public.orders", "7") is None
    third.close()


def test_a_group_whose_state_message_was_lost_is_read_again_from_the_state_before_it(backend, tmp_path):
    first = backend.open_on(tmp_path / "host-a.db")
    first.shadow_put("public.orders", "1", {"status": "new"})
    add(first, xid=1, n=1)
    first.commit("s", 0x10)
    first.shadow_put("public.orders", "1", {"status": "paid"})
    add(first, xid=2, n=2)
    first._send(0x20, "s")  # the events are stored; the process died before the state was
    first.close()

    second = backend.open_on(tmp_path / "host-b.db")
    assert second.checkpoint("s") == 0x10
    assert second.shadow_get("public.orders", "1") == {"status": "new"}  # as of 0x10
    second.shadow_put("public.orders", "1", {"status": "paid"})  # transaction 2 read again
    add(second, xid=2, n=2)
    second.commit("s", 0x20)
    second.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "2:0", "2:1"]
    third = backend.open_on(tmp_path / "host-c.db")
    assert third.checkpoint("s") == 0x20
    assert third.shadow_get("public.orders", "1") == {"status": "paid"}
    third.close()


def test_the_state_stream_is_snapshotted_and_purged_and_a_new_host_reads_the_snapshot(
    backend, tmp_path, monkeypatch
):
    monkeypatch.setattr(jetstream_sink, "SNAPSHOT_MIN", 30)
    monkeypatch.setattr(jetstream_sink, "STATE_CHUNK", 7)  # a snapshot of several messages
    first = backend.open_on(tmp_path / "host-a.db")
    follower = backend.open_on(tmp_path / "host-b.db")  # a standby's copy, read early
    assert follower.checkpoint("s") is None
    for n in range(80):
        first.shadow_put("public.orders", str(n % 20), {"status": f"s{n}"})
        cart(first, f"c{n % 5}", float(n))
        first.commit("s", 0x100 + n)
    first.close()

    loop = LoopThread()
    states = state_log(backend.log())
    try:
        loop.run(states.connect())
        bounds = loop.run(states.bounds())
        loop.run(states.close())
    finally:
        loop.stop()
    assert bounds[0] > 1, "purged before the last snapshot"
    assert bounds[1] - bounds[0] + 1 < 60

    expected = {str(k): {"status": f"s{max(n for n in range(80) if n % 20 == k)}"} for k in range(20)}
    for sink in (backend.open_on(tmp_path / "host-c.db"), follower):  # anew; and past the purge
        assert sink.checkpoint("s") == 0x100 + 79
        assert {str(k): sink.shadow_get("public.orders", str(k)) for k in range(20)} == expected
        assert sorted(c["key"] for c in sink.state.state_due("cart", 1000.0, 100)) == [
            f"c{i}" for i in range(5)
        ]
        sink.close()


def test_a_standby_reading_the_ends_does_not_fence_the_writer_and_takes_over_after_it(backend, tmp_path):
    active = backend.open_on(tmp_path / "host-a.db")
    standby = backend.open_on(tmp_path / "host-b.db")
    for xid in range(1, 4):
        add(active, xid=xid, n=2)
        active.shadow_put("public.orders", str(xid), {"status": "paid"})
        active.commit("s", 0x10 * xid)
        assert standby.checkpoint("s") == 0x10 * xid  # the standby's copy follows
        assert standby.shadow_get("public.orders", str(xid)) == {"status": "paid"}
    active.close()  # the active one dies; the standby's next session takes over
    assert standby.checkpoint("s") == 0x30
    add(standby, xid=4, n=1)
    standby.commit("s", 0x40)
    standby.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "1:1", "2:0", "2:1", "3:0", "3:1", "4:0"]


def test_a_standby_that_read_the_end_before_the_writers_last_append_starts_over_not_in_between(
    backend, tmp_path
):
    active = backend.open_on(tmp_path / "host-a.db")
    add(active, xid=1, n=1)
    active.commit("s", 0x10)
    standby = backend.open_on(tmp_path / "host-b.db")
    assert standby.checkpoint("s") == 0x10
    add(active, xid=2, n=1)  # the writer's last group, after the standby read the end
    active.commit("s", 0x20)
    active.close()
    add(standby, xid=2, n=1)  # read again from 0x10: it does not know 2 is in the stream
    with pytest.raises(Moved):  # a new session, as for a lost source: not fenced for good
        standby.commit("s", 0x20)
    standby.rollback()
    assert standby.checkpoint("s") == 0x20
    add(standby, xid=3, n=1)
    standby.commit("s", 0x30)
    standby.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "2:0", "3:0"]


def test_each_entity_goes_to_one_partition_and_a_partition_reads_alone_in_order(backend):
    sink = backend.open()
    assert isinstance(sink, JetStreamSink)
    for xid in range(1, 6):
        for order in range(8):  # every order changes once per transaction
            data = {"object": "order", "id": order, "record": {"id": order, "v": xid}, "previous": None}
            sink.add("order.updated", "order", order, data, AT, "public.orders", "update", "0/1", xid)
        sink.commit("s", 0x10 * xid)
    sink.close()
    stored = {seq: body for seq, _, body in backend.stored()}
    loop = LoopThread()
    log = backend.log()
    parts: dict[int, list[int]] = {}
    try:
        loop.run(log.connect())

        async def partition(p: int) -> list[int]:
            seqs: list[int] = []
            batches = log.follow(0, partition=p)
            with contextlib.suppress(TimeoutError):
                while True:  # until a second passes with nothing more
                    seqs += [s.seq for s in await asyncio.wait_for(batches.__anext__(), 1.0)]
            return seqs

        for p in range(PARTITIONS):
            parts[p] = loop.run(partition(p))
        loop.run(log.close())
    finally:
        loop.stop()
    seen = sorted(seq for seqs in parts.values() for seq in seqs)
    assert seen == sorted(stored)  # every event in exactly one partition
    for p, seqs in parts.items():
        assert seqs == sorted(seqs)
        orders = {stored[seq]["entity_key"] for seq in seqs}
        for other, its in parts.items():  # an entity's events are all in one partition
            if other != p:
                assert not orders & {stored[seq]["entity_key"] for seq in its}
        for order in orders:  # and in their order
            versions = [stored[s]["data"]["record"]["v"] for s in seqs if stored[s]["entity_key"] == order]
            assert versions == [1, 2, 3, 4, 5]


# -- faults an independent review found (each test failed before its fix) --------------------


def test_a_read_again_split_over_commits_then_cut_again_sends_nothing_twice(backend, tmp_path):
    """The state message of a commit made while reading again must not claim the events
    still to pass over: a second cut (a crash, a take-over) would send them again."""
    sink = backend.open_on(tmp_path / "a.db")
    add(sink, xid=1, n=1)
    sink.commit("s", 0x10)
    add(sink, xid=2, n=2)
    add(sink, xid=3, n=1)
    sink._send(0x30, "s")  # the events stored; the state message lost (a crash)
    sink.close()

    again = backend.open_on(tmp_path / "a.db")
    assert again.checkpoint("s") == 0x10
    add(again, xid=2, n=2)  # passed over
    again.commit("s", 0x20)  # read again in a smaller group ...
    again.close()  # ... and cut again before transaction 3

    third = backend.open_on(tmp_path / "c.db")  # a standby, or the same host
    assert third.checkpoint("s") == 0x20
    add(third, xid=3, n=1)  # transaction 3 read again
    third.commit("s", 0x30)
    third.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "2:0", "2:1", "3:0"]


def test_a_new_session_in_the_same_process_keeps_what_is_still_to_pass_over(backend, tmp_path):
    sink = backend.open_on(tmp_path / "a.db")
    add(sink, xid=1, n=1)
    sink.commit("s", 0x10)
    add(sink, xid=2, n=1)
    add(sink, xid=3, n=1)
    sink._send(0x30, "s")
    sink.close()
    again = backend.open_on(tmp_path / "a.db")
    assert again.checkpoint("s") == 0x10
    add(again, xid=2, n=1)
    again.commit("s", 0x20)
    again.rollback()  # a Postgres blip: a new session
    assert again.checkpoint("s") == 0x20
    add(again, xid=3, n=1)
    again.commit("s", 0x30)
    again.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "2:0", "3:0"]


def test_a_standby_folding_while_the_writer_snapshots_and_purges_reads_the_snapshot(
    backend, tmp_path, monkeypatch
):
    monkeypatch.setattr(jetstream_sink, "READ_BATCH", 5)
    monkeypatch.setattr(jetstream_sink, "SNAPSHOT_MIN", 3)
    active = backend.open_on(tmp_path / "a.db")
    standby = backend.open_on(tmp_path / "b.db")
    for n in range(20):
        active.shadow_put("public.orders", str(n), {"status": "x"})
        active.commit("s", 0x100 + n)
        active._in_stream = 0  # no snapshot yet
    reads: list[tuple[int, int]] = []

    def read(log: JetStreamLog, after: int, upto: int) -> Any:
        reads.append((after, upto))
        if len(reads) == 2:  # the writer snapshots and purges while the standby folds
            active.shadow_put("public.orders", "0", {"status": "y"})
            active._in_stream = 10**6
            active.commit("s", 0x200)
        assert len(reads) < 40, f"the fold makes no progress: {reads[-3:]}"
        return JetStreamSink._read(log, after, upto)

    standby._read = read  # type: ignore[method-assign]
    assert standby.checkpoint("s") == 0x200
    assert standby.shadow_get("public.orders", "0") == {"status": "y"}
    assert standby.shadow_get("public.orders", "19") == {"status": "x"}
    standby.close()
    active.close()


def test_a_standby_polls_while_the_writer_is_inside_a_huge_transaction(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(jetstream, "MAX_GROUP_SCAN", 500)  # (100,000 in production)
    active = backend.open_on(tmp_path / "a.db")
    standby = backend.open_on(tmp_path / "b.db")
    add(active, xid=1, n=1)
    active.commit("s", 0x10)
    add(active, xid=9, n=2 * CHUNK)  # a huge transaction under way: a chunk is stored
    assert standby.checkpoint("s") == 0x10  # a standby's try: no error, no read-back
    standby.close()
    active.close()


def test_a_new_session_keeps_the_local_copy_it_brought_up_to_date(backend, tmp_path, monkeypatch):
    sink = backend.open_on(tmp_path / "a.db")
    sink.shadow_put("public.orders", "1", {"status": "new"})
    sink.commit("s", 0x10)
    resets: list[bool] = []
    monkeypatch.setattr(JetStreamSink, "_reset_local", lambda self: resets.append(True))
    assert sink.checkpoint("s") == 0x10  # a new session: the copy is current, nothing rebuilt
    assert resets == []
    sink.close()


def test_what_a_passed_group_did_not_give_again_is_no_longer_waited_for(backend, tmp_path):
    """A group stored before a crash whose transaction is not read again (skipped since,
    say): once the checkpoint passes that group, its keys are let go, so the resume point
    moves on instead of reading back ever more at each restart."""
    sink = backend.open_on(tmp_path / "a.db")
    add(sink, xid=1, n=1)
    sink.commit("s", 0x10)
    add(sink, xid=99, n=2)
    sink._send(0x20, "s")  # stored; the state message lost
    sink.close()
    again = backend.open_on(tmp_path / "a.db")
    assert again.checkpoint("s") == 0x10
    add(again, xid=2, n=1)  # transaction 99 does not come back
    again.commit("s", 0x30)
    again.close()
    third = backend.open_on(tmp_path / "c.db")
    assert third.checkpoint("s") == 0x30
    assert third._pass_over() == {}  # nothing stored past what 0x30 covers
    third.close()
    assert [key for _, key, _ in backend.stored()] == ["1:0", "99:0", "99:1", "2:0"]


def test_a_backfill_chunk_whose_local_commit_was_lost_keeps_its_job_s_progress(backend):
    """A backfill chunk's events and its job's progress commit in one group: the progress
    goes into the state stream with them, so a crash before the local file committed it
    does not read the chunk again (reproduced first: the progress was in the local file
    alone, the chunk was read again under a new watermark, and its rows went into the
    stream twice)."""
    sink = backend.open()
    assert isinstance(sink, JetStreamSink)
    sink.backfill_request(["public.orders"], "test", 100.0)
    sink.commit("s", 0x10)
    (job,) = sink.backfills()
    for i in range(3):  # the chunk's rows, at its watermark's position
        data = {"object": "order", "id": i, "record": {"id": i}, "previous": None}
        sink.add("order.snapshot", "order", i, data, AT, "public.orders", "read", "0/18", None)
    sink.backfill_update(job["id"], state="running", after=[2], rows=3, events=3)

    def lost(*_: object) -> None:
        raise OSError("the process died before the local file committed")

    sink.local.commit = lost  # type: ignore[method-assign]
    with contextlib.suppress(OSError):
        sink.commit("s", 0x20)
    del sink.local.commit
    sink.local.rollback()
    backend.close(sink)

    again = backend.open()
    assert again.checkpoint("s") == 0x20
    (resumed,) = again.backfills()
    assert (resumed["id"], resumed["after"], resumed["rows_done"]) == (job["id"], [2], 3)
    backend.close(again)


def test_a_backfill_chunk_read_again_under_a_new_watermark_is_stored_once(backend):
    """A crash after a backfill chunk's events reached the stream but before its group's
    state message: the chunk is read again and comes back under a new watermark.  Its
    rows are named by job and chunk, not by the watermark's position, so they are passed
    over (reproduced first: three rows went into the stream twice)."""

    def chunk(sink: Sink, watermark: str) -> None:
        for i in range(3):
            data = {"object": "order", "id": i, "record": {"id": i}, "previous": None}
            sink.add(
                "order.snapshot", "order", i, data, AT, "public.orders", "read", watermark, None, "bf1:null"
            )

    sink = backend.open()
    assert isinstance(sink, JetStreamSink)
    sink.commit("s", 0x10)
    chunk(sink, "0/18")
    sink._send(0x20, "s")  # the events stored; the state message lost (a crash)
    sink.local.rollback()
    backend.close(sink)

    again = backend.open()
    assert again.checkpoint("s") == 0x10
    add(again, xid=3, n=1)  # the WAL written meanwhile, read first: a commit past the lost group's
    again.commit("s", 0x28)
    chunk(again, "0/38")  # then the chunk read again: another watermark, another position
    again.commit("s", 0x40)
    assert isinstance(again, JetStreamSink) and not again._skip  # nothing more is waited for
    backend.close(again)
    assert [(b["entity_key"], b["lsn"]) for _, _, b in backend.stored()] == [
        ("0", "0/18"),
        ("1", "0/18"),
        ("2", "0/18"),
        ("0", "0/1"),
    ]


def test_a_backfill_job_s_progress_in_the_state_stream_moves_only_its_own_host_s_job(backend, tmp_path):
    """Job ids are a host's own: another capture host reading the state stream (a
    standby) must not take the active one's progress for its own job of that id
    (reproduced first: host B's job 1 got host A's position and row counts)."""
    b_file = tmp_path / "host-b.db"
    b_local = OutboxWriter(store.open_outbox(b_file), Router([]))
    b_local.backfill_request(["public.customers"], "b's own", 50.0)  # B's job 1: another table
    b_local.commit(None)
    b_local.close()

    a = backend.open_on(tmp_path / "host-a.db")
    a.backfill_request(["public.orders"], "a's", 100.0)
    a.commit("s", 0x10)
    (job,) = a.backfills()
    a.backfill_update(job["id"], state="running", after=[7], rows=7, events=7)
    a.commit("s", 0x20)
    a.close()

    b = backend.open_on(b_file)  # B syncs from the streams (a standby's try)
    (own,) = b.backfills()
    assert (
        own["id"],
        own["table"],
        own["after"],
        own["rows_done"],
    ) == (
        job["id"],
        "public.customers",
        None,
        0,
    )
    b.close()


def test_a_skip_asked_on_any_host_is_for_whichever_captures_and_one_done_is_done_for_all(backend, tmp_path):
    """`ct1-cdc slot skip` puts the request into the cluster too: a capture host that did
    not record it (the standby that took over) skips that transaction; the skip itself goes
    into the state stream, so the next host knows it was done (reproduced first: each
    host saw only its own file's requests)."""
    share_skip(backend.log(), 77, 1000.0)  # `slot skip 77` on a third host
    a = backend.open_on(tmp_path / "host-a.db")
    assert a.pending_skips() == {77}
    a.mark_skipped(77, "0/30", 4)
    a.commit("s", 0x30)
    a.close()

    b = backend.open_on(tmp_path / "host-b.db")  # the standby, taking over
    assert b.pending_skips() == set()
    assert [(s["xid"], s["lsn"], s["changes"]) for s in source_state.skips(b.local.conn)] == [(77, "0/30", 4)]
    b.close()


def test_a_manual_event_asked_through_the_cluster_is_appended_once_across_a_crash(backend, tmp_path):
    """A manual event (`POST /webhooks/send` on an API node: a request in the cluster,
    outbox/jetstream_sends.py) appended by capture, the process dying after its group
    reached the stream but before the state did (so the request's mark was lost): served
    again after the next checkpoint passed that group, it is passed over by its name, not
    stored twice; served again with its mark there, nothing.  A request is either taken
    by capture or withdrawn by its API node, never both, also when a first try's reply is
    lost and the call is made again."""
    row = {"type": "ops.notice", "data": {"n": 1}, "endpoints": ["ct2"], "occurred_at": AT}
    sink = backend.open_on(tmp_path / "a.db")
    first = sink.run(sends.ask(sink.log, "r1", row, 10.0))
    assert sink.run(sends.take(sink.log, "r1", row, first))
    assert sink.run(sends.take(sink.log, "r1", row, first))  # (a reply lost: asked again, still ours)
    assert not sink.run(sends.withdraw(sink.log, "r1", first))  # too late: taken
    add(sink, xid=1, n=1)
    sink.commit("s", 0x10)
    assert served("r1", row, sink)
    sink._send(0x20, "s")  # stored; the state message lost
    sink.close()

    again = backend.open_on(tmp_path / "a.db")
    assert again.checkpoint("s") == 0x10
    add(again, xid=2, n=1)
    again.commit("s", 0x30)  # past the stored group: the manual event is still waited for
    assert served("r1", row, again)  # (asked again: its key is passed over)
    again.commit("s", 0x40)
    assert not served("r1", row, again)  # its mark
    again.run(sends.done(again.log, "r1"))
    assert again.run(sends.state_of(again.log, "r1")) is None
    revision = again.run(sends.ask(again.log, "r2", {**row, "data": {"n": 2}}, 10.0))
    assert again.run(sends.ask(again.log, "r2", {**row, "data": {"n": 2}}, 10.0)) == revision  # (made once)
    assert again.run(sends.withdraw(again.log, "r2", revision))
    assert again.run(sends.withdraw(again.log, "r2", revision))  # (a reply lost: asked again)
    assert not again.run(sends.take(again.log, "r2", row, revision))
    again.commit("s", 0x50)
    again.close()

    third = backend.open_on(tmp_path / "c.db")
    assert third.checkpoint("s") == 0x50
    assert third._pass_over() == {}  # the resume point moved on
    assert not served("r1", row, third)  # its mark came with the state
    third.close()
    stored = backend.stored()
    assert [key for _, key, _ in stored] == ["1:0", "send:r1:ops.notice:None:0", "2:0"]
    assert stored[1][2]["endpoints"] == ["ct2"] and stored[1][2]["name"] == "send:r1"
