"""The capture loop driven by a recorded stream, without Postgres or SQLite: what it
confirms to the slot and when, what it skips on resume, how it groups commits.

The fakes (tests/fakes.py) play the slot, the source database and the outbox; the memory
sink passes the same contract tests as the outbox writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from cdc.capture import Capture
from cdc.mapping import parse_mapping
from common.errors import CaptureError, SourceUnavailable
from common.formats import format_lsn
from config.settings import Settings
from tests.fakes import FakeClock, FakeSlot, FakeSource, MemoryOutbox, MemorySink, Txn, Wal


@pytest.fixture(autouse=True, params=[64, 1], ids=["batches", "a frame a read"])
def reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test with the slot read as the native reader reads it (rows decoded, many a
    read) and as psycopg's path does (a frame a read, without a C compiler)."""
    monkeypatch.setattr(FakeSlot, "batch", request.param)


MAPPING = parse_mapping(
    """
[defaults]
exclude_columns = ["password"]

[[rule]]
table = "public.users"
on = ["insert"]
emit = "customer.created"
object = "customer"
key = "id"

[[rule]]
table = "public.users"
on = ["update"]
emit = "customer.updated"
object = "customer"
key = "id"
"""
)
TABLES = {"public.users": ("id", "name", "email", "password"), "public.noise": ("id", "payload")}


def user(i: int) -> tuple[str, str, dict[str, Any]]:
    return ("insert", "public.users", {"id": i, "name": f"u{i}", "email": f"u{i}@x", "password": "p"})


def noise(i: int) -> tuple[str, str, dict[str, Any]]:
    return ("insert", "public.noise", {"id": i, "payload": "x" * 100})


@dataclass
class Rig:
    """One capture over a fake slot, source and outbox; :meth:`run` until the WAL ends."""

    wal: Wal = field(default_factory=Wal)
    outbox: MemoryOutbox = field(default_factory=MemoryOutbox)
    clock: FakeClock = field(default_factory=FakeClock)
    outbox_settings: dict[str, Any] = field(default_factory=dict)
    source_settings: dict[str, Any] = field(default_factory=dict)
    per_frame: float = 0.0
    fail_commits: BaseException | None = None
    reachable: bool = True
    witnessed: list[tuple[int, int, list[int | None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slot = FakeSlot(self.wal, self.clock, per_frame=self.per_frame, witness=self._witness)
        self.source = FakeSource(TABLES, reachable=self.reachable, on_heartbeat=self.slot.emit_heartbeat)

    def _witness(self, flush: int) -> None:
        # what the outbox holds durably at the moment a position is reported to Postgres
        self.witnessed.append((flush, self.outbox.checkpoints.get("s", 0), self.outbox.xids()))

    def capture(self) -> Capture:
        settings = Settings(
            source={"dsn": "postgresql:///unused", "slot": "s", **self.source_settings},
            outbox={"path": "unused.db", **self.outbox_settings},
        )
        sink = MemorySink(self.outbox, fail_commits=self.fail_commits)
        capture = Capture(
            settings, MAPPING, sink=sink, frames=self.slot, source=self.source, clock=self.clock
        )
        self.slot.at_end = capture.stop
        return capture

    def run(self) -> Capture:
        capture = self.capture()
        capture.run()
        return capture

    def names(self) -> list[str]:
        return [e.data["record"]["name"] for e in self.outbox.events]

    def flushes(self) -> list[int]:
        return [s.flush for s in self.slot.statuses]


def durable_xids_cover(rig: Rig, txns: list[Txn]) -> None:
    """At every status update, each mapped transaction ending at or before the reported
    position already had its events in the outbox."""
    for flush, _checkpoint, xids in rig.witnessed:
        owed = [t.xid for t in txns if t.end <= flush]
        assert all(xid in xids for xid in owed), f"{format_lsn(flush)} reported before {owed} were durable"


# -- confirm only what is durable -------------------------------------------------------------


def test_the_slot_is_told_a_position_only_once_the_events_before_it_are_committed():
    rig = Rig()
    t1 = rig.wal.transaction(user(1), user(2))
    t2 = rig.wal.transaction(user(3))
    rig.wal.keepalive(reply=True)  # Postgres asks while both are only buffered
    rig.wal.pause()  # the stream pauses: the group commit
    rig.wal.keepalive(reply=True)
    rig.run()
    assert rig.names() == ["u1", "u2", "u3"]
    durable_xids_cover(rig, [t1, t2])
    first_reply = rig.slot.statuses[0]
    assert first_reply.reply and first_reply.flush < t1.end  # the answer claimed nothing buffered
    assert rig.slot.confirmed == t2.end
    assert rig.outbox.checkpoints["s"] == t2.end


def test_a_sink_that_cannot_commit_never_lets_the_slot_move_past_its_changes():
    rig = Rig(fail_commits=OSError("disk I/O error"))
    rig.wal.transaction(user(1))
    rig.wal.keepalive()
    rig.wal.pause()
    rig.wal.keepalive(reply=True)
    with pytest.raises(OSError, match="disk I/O error"):
        rig.run()
    assert rig.slot.confirmed == 0  # Postgres keeps the WAL: nothing is lost
    assert rig.outbox.events == [] and "s" not in rig.outbox.checkpoints


def test_a_keepalive_in_the_middle_of_a_transaction_does_not_confirm_it():
    rig = Rig()
    wal = rig.wal

    def keepalive_then_drop(i: int) -> None:
        if i == 1:
            wal.lsn += 0x1000  # the server is already far past the rows sent so far
            wal.keepalive(reply=True)
            wal.disconnect()

    t1 = wal.transaction(user(1), user(2), between=keepalive_then_drop)
    capture = rig.run()
    assert capture.stats.reconnects == 1
    assert rig.flushes()[0] < t1.end  # what the keepalive said was never confirmed early
    assert rig.slot.confirmed == t1.end  # and not after the commit either: the rows before it were owed
    durable_xids_cover(rig, [t1])
    assert rig.names() == ["u1", "u2"]  # the row before the drop was rolled back, then sent again


# -- an idle database does not hold WAL -------------------------------------------------------


def test_an_idle_stream_moves_the_slot_to_the_servers_position():
    rig = Rig()
    rig.wal.keepalive()
    rig.wal.transaction(noise(1), noise(2))  # changes the mapping does not capture
    rig.wal.pause()
    rig.wal.lsn += 0x10_000  # other databases write WAL meanwhile
    last = rig.wal.keepalive()
    rig.wal.pause()
    rig.run()
    assert rig.outbox.events == []
    assert rig.slot.confirmed == last
    assert rig.flushes() == sorted(rig.flushes())  # the position only moves forward


def test_capture_heartbeats_advance_the_slot_with_no_traffic_and_no_keepalives():
    rig = Rig(source_settings={"heartbeat_seconds": 1.0})
    for _ in range(6):
        rig.wal.pause()  # each lets half a second pass (capture's read timeout)
    rig.run()
    assert rig.source.heartbeats >= 2
    assert rig.slot.confirmed == rig.wal.lsn  # the last heartbeat that came back through the stream
    assert rig.outbox.events == []


# -- resume -----------------------------------------------------------------------------------


def test_transactions_at_or_before_the_checkpoint_are_skipped_when_sent_again():
    rig = Rig()
    rig.wal.transaction(user(1))
    t2 = rig.wal.transaction(user(2), user(3))
    rig.wal.pause()
    rig.run()
    assert rig.outbox.checkpoints["s"] == t2.end
    # the crash window: committed in the outbox, the confirmation never reached Postgres
    rig.slot.confirmed = 0
    rig.wal.transaction(user(4))
    again = rig.run()
    assert rig.slot.starts == [0, t2.end]  # the new session asked from the checkpoint
    assert rig.names() == ["u1", "u2", "u3", "u4"]  # sent twice, stored once
    assert again.stats.skipped_transactions == 2 and again.stats.transactions == 1
    assert [e.id for e in rig.outbox.events] == [1, 2, 3, 4]


def test_a_lost_connection_loses_nothing_and_stores_nothing_twice():
    rig = Rig()
    t1 = rig.wal.transaction(user(1))
    rig.wal.pause()  # t1 is committed and confirmed
    t2 = rig.wal.transaction(user(2), user(3), between=lambda i: i == 1 and rig.wal.disconnect())
    t3 = rig.wal.transaction(user(4))
    capture = rig.run()
    assert capture.stats.reconnects == 1
    assert rig.slot.starts == [0, t1.end]
    assert rig.names() == ["u1", "u2", "u3", "u4"]
    assert rig.slot.confirmed == t3.end
    durable_xids_cover(rig, [t1, t2, t3])


def test_a_source_never_reached_fails_the_run_instead_of_waiting():
    rig = Rig(reachable=False)
    capture = rig.capture()
    with pytest.raises(SourceUnavailable, match=r"check source\.dsn"):
        capture.run()
    assert capture.stats.reconnects == 0 and rig.slot.starts == []


# -- skipping a named transaction ---------------------------------------------------------------


def test_a_transaction_an_operator_named_is_passed_and_recorded_with_the_checkpoint():
    rig = Rig()
    rig.wal.transaction(user(1))
    t2 = rig.wal.transaction(user(2), user(3), user(4))
    t3 = rig.wal.transaction(user(5))
    rig.outbox.request_skip(t2.xid)
    capture = rig.run()
    assert rig.names() == ["u1", "u5"]
    assert rig.outbox.skips == {t2.xid: (format_lsn(t2.end), 3)}
    (recorded,) = [c for c in rig.outbox.commits if c.skipped]
    assert recorded.skipped == (t2.xid,) and recorded.lsn >= t2.end  # one commit: skip and checkpoint
    assert rig.slot.confirmed == t3.end
    assert capture.stats.transactions == 2


def test_a_message_capture_cannot_decode_stops_it_naming_the_transaction_to_skip():
    rig = Rig()
    t1 = rig.wal.transaction(user(1))
    rig.wal.pause()
    rig.wal.transaction(user(2), between=lambda i: rig.wal.garbage(rig.wal.lsn + 0x100))
    with pytest.raises(CaptureError, match=rf"ct1-cdc slot skip {t1.xid + 1}`"):
        rig.run()
    assert rig.names() == ["u1"]
    assert rig.slot.confirmed == t1.end  # not past the transaction it could not read


# -- group commit -------------------------------------------------------------------------------


def test_small_transactions_share_commits_of_at_most_batch_max_events():
    rig = Rig(outbox_settings={"batch_max_events": 4})
    txns = [rig.wal.transaction(user(i)) for i in range(10)]
    rig.run()
    assert [(c.events, c.lsn) for c in rig.outbox.commits] == [
        (4, txns[3].end),
        (4, txns[7].end),
        (2, txns[9].end),
    ]


def test_a_transaction_bigger_than_a_batch_is_committed_whole():
    rig = Rig(outbox_settings={"batch_max_events": 3})
    big = rig.wal.transaction(*(user(i) for i in range(10)))
    small = rig.wal.transaction(user(10))
    rig.run()
    # never a checkpoint inside a transaction: a restart would lose the rest of it
    assert [(c.events, c.lsn) for c in rig.outbox.commits] == [(10, big.end), (1, small.end)]


def test_while_data_streams_in_a_commit_comes_at_least_every_batch_max_ms():
    rig = Rig(per_frame=1 / 64, outbox_settings={"batch_max_ms": 50})  # 3 frames a transaction
    txns = [rig.wal.transaction(user(i)) for i in range(10)]
    rig.run()
    # A group's age counts from when capture sees its first transaction begin.  A frame a
    # read, that is when the begin arrives: two transactions of 47 ms make a group.  As the
    # native reader reads, a transaction comes whole, so here its three frames' time has
    # passed when capture sees its begin: three make a group, and the last one is alone.
    per = 3 if FakeSlot.batch > 1 else 2
    ends = txns[per - 1 :: per] + ([txns[-1]] if len(txns) % per else [])
    assert [c.lsn for c in rig.outbox.commits] == [t.end for t in ends]
    assert sum(c.events for c in rig.outbox.commits) == 10


def test_when_the_stream_pauses_what_is_pending_commits():
    rig = Rig()
    t1 = rig.wal.transaction(user(1))
    rig.wal.pause()
    t2 = rig.wal.transaction(user(2))
    rig.wal.pause()
    rig.run()
    assert [(c.events, c.lsn) for c in rig.outbox.commits][:2] == [(1, t1.end), (1, t2.end)]


# -- work handed to capture's thread (Capture.submit) -------------------------------------------


def appended(sink: Any) -> str:
    """Work handed to capture: one event (customer 99, "handed")."""
    data = {"object": "customer", "id": 99, "record": {"name": "handed"}, "previous": None}
    sink.add("customer.created", "customer", 99, data, "2026-11-25T00:00:00Z", None, "derived", None, None)
    return "done"


def test_work_whose_group_a_lost_slot_rolled_back_fails_and_is_not_answered_by_a_later_commit():
    """With ``on_slot_lost = "recover"`` capture goes on in a new session; what waited for
    the group the lost slot rolled back was answered by the next commit, as if it had been
    stored (a review found it)."""
    rig = Rig(source_settings={"on_slot_lost": "recover"})
    rig.wal.transaction(user(1))
    rig.wal.pause()
    rig.source.lost_once = True
    capture = rig.capture()

    answered = capture.submit(appended)
    capture.run()
    assert "ct1.gap" in [e.type for e in rig.outbox.events]  # (recovered, and went on)
    with pytest.raises(CaptureError, match="not committed"):
        answered.result(timeout=0)
    assert not [e for e in rig.outbox.events if e.data.get("id") == 99]  # (nor stored)


def test_work_handed_to_capture_commits_with_its_group_and_answers_after_that_commit():
    rig = Rig()
    rig.wal.transaction(user(1))
    rig.wal.pause()
    rig.wal.transaction(user(2))
    rig.wal.pause()
    capture = rig.capture()

    answered = capture.submit(appended)
    given_up = capture.submit(lambda sink: pytest.fail("a request given up is not run"))
    assert given_up.cancel()  # (the one who asked gave up before capture got to it)
    capture.run()
    assert answered.result(timeout=0) == "done"
    assert "handed" in rig.names() and rig.names().index("handed") < rig.names().index("u2")
    late = capture.submit(lambda sink: None)  # capture has stopped: refused, not left waiting
    late.cancel()  # (a caller giving up on it is no error either)
    capture.run()
