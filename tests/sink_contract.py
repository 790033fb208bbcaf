"""What capture relies on from its sink (cdc.ports.Sink), as tests every sink passes:
the outbox writer on a real SQLite file (tests/integration/test_sink_outbox.py) and the
memory sink the capture loop's unit tests use (tests/unit/test_sink_memory.py).

A test module subclasses :class:`SinkContract` and gives a ``backend`` fixture.
"""

from __future__ import annotations

from typing import Any, Protocol

from cdc.ports import Sink
from tests.waiting import wait_until

AT = "2026-11-25T15:07:53.877066Z"


class Backend(Protocol):
    """One kind of sink and a look at what it made durable."""

    def open(self) -> Sink:
        """A sink on the store; opening again after :meth:`close` is capture restarting."""

    def close(self, sink: Sink) -> None:
        """Close without committing: what was not committed is lost, as in a crash."""

    def events(self) -> list[tuple[int, str, Any, dict[str, Any], int | None]]:
        """The committed events, oldest first: (id, type, entity id, data, xid)."""

    def request_skip(self, xid: int) -> None:
        """What ``ct1-cdc slot skip XID`` does."""

    def skips(self) -> dict[int, tuple[str, int] | None]:
        """Every requested skip: (lsn, changes) once capture skipped it, else None."""

    def problems(self) -> list[tuple[str, str]]:
        """The stored mapping problems: (kind, message)."""


def add(sink: Sink, ids: range, xid: int = 1) -> None:
    for i in ids:
        data = {"object": "customer", "id": i, "record": {"id": i, "name": f"n{i}"}, "previous": None}
        sink.add("customer.created", "customer", i, data, AT, "public.users", "insert", "0/1", xid)


def commit(sink: Sink, slot: str, lsn: int) -> int:
    """Commit, and wait until the sink says the commit is durable (a sink may finish it
    after ``commit`` returns: the SQLite writer's thread).  Its checkpoint is then the
    durable one, never before."""
    before = sink.durable_lsn
    number = sink.commit(slot, lsn, wait=False)
    done, durable = sink.commits_durable, sink.durable_lsn
    assert durable == lsn if done >= number else durable in (before, lsn)
    wait_until(lambda: sink.commits_durable >= number, 10, interval=0.001, what=f"commit {number} durable")
    assert sink.durable_lsn == lsn
    return number


PROBLEM = {"kind": "missing_column", "table": "public.users", "rule": 1, "message": "no column x", "fix": "f"}


class SinkContract:
    def test_committed_events_and_the_checkpoint_survive_a_restart(self, backend: Backend) -> None:
        sink = backend.open()
        add(sink, range(1, 4), xid=7)
        commit(sink, "s", 0x100)
        assert sink.durable_lsn == 0x100
        assert sink.last_event_id == 3
        backend.close(sink)
        again = backend.open()
        assert again.checkpoint("s") == 0x100
        assert again.durable_lsn == 0x100  # what was read back may be confirmed
        assert again.checkpoint("other") is None
        events = backend.events()
        assert [(e[0], e[1], e[2], e[4]) for e in events] == [
            (i, "customer.created", str(i), 7) for i in (1, 2, 3)
        ]
        assert events[0][3] == {
            "object": "customer",
            "id": 1,
            "record": {"id": 1, "name": "n1"},
            "previous": None,
        }
        backend.close(again)

    def test_nothing_added_since_the_last_commit_survives_a_rollback_or_a_crash(
        self, backend: Backend
    ) -> None:
        sink = backend.open()
        add(sink, range(1, 3))
        commit(sink, "s", 0x10)
        add(sink, range(3, 6))
        sink.shadow_put("public.users", "1", {"status": "new"})
        sink.rollback()
        assert (sink.pending, sink.in_transaction, sink.last_event_id) == (0, False, 2)
        assert sink.shadow_get("public.users", "1") is None
        add(sink, range(6, 7))
        backend.close(sink)  # no commit: a crash
        again = backend.open()
        assert again.checkpoint("s") == 0x10
        assert [e[0] for e in backend.events()] == [1, 2]
        add(again, range(7, 8))
        commit(again, "s", 0x20)
        assert [(e[0], e[2]) for e in backend.events()] == [
            (1, "1"),
            (2, "2"),
            (3, "7"),
        ]  # ids stay contiguous
        backend.close(again)

    def test_commits_are_numbered_in_order_and_a_rollback_takes_no_number(self, backend: Backend) -> None:
        sink = backend.open()
        add(sink, range(1, 3))
        assert commit(sink, "s", 0x10) == 1
        add(sink, range(3, 5))
        sink.rollback()
        add(sink, range(5, 6))
        assert commit(sink, "s", 0x20) == 2
        assert commit(sink, "s", 0x30) == 3  # (nothing added: a number all the same)
        assert sink.commits_durable == 3
        backend.close(sink)

    def test_the_checkpoint_is_durable_only_with_a_commit(self, backend: Backend) -> None:
        sink = backend.open()
        assert (sink.durable_lsn, sink.pending, sink.in_transaction) == (0, 0, False)
        add(sink, range(1, 3))
        assert (sink.durable_lsn, sink.pending, sink.in_transaction) == (0, 2, True)
        commit(sink, "s", 0x30)
        assert (sink.durable_lsn, sink.pending, sink.in_transaction) == (0x30, 0, False)
        commit(sink, "s", 0x40)  # nothing added: the checkpoint alone moves
        assert sink.durable_lsn == 0x40 and sink.checkpoint("s") == 0x40
        backend.close(sink)

    def test_the_shadow_is_read_back_as_written_and_kept_with_the_commit(self, backend: Backend) -> None:
        sink = backend.open()
        sink.shadow_put("public.orders", "1", {"status": "paid", "total": "59.90"})
        sink.shadow_put("public.orders", "2", {"status": "new", "total": "1.00"})
        assert sink.in_transaction
        assert sink.shadow_get("public.orders", "1") == {"status": "paid", "total": "59.90"}
        commit(sink, "s", 0x10)
        sink.shadow_delete("public.orders", "2")
        assert sink.shadow_get("public.orders", "2") is None
        commit(sink, "s", 0x20)
        backend.close(sink)
        again = backend.open()
        assert again.shadow_get("public.orders", "1") == {"status": "paid", "total": "59.90"}
        assert again.shadow_get("public.orders", "2") is None
        assert again.shadow_get("public.users", "1") is None
        backend.close(again)

    def test_a_skip_is_recorded_only_with_the_commit_that_passes_it(self, backend: Backend) -> None:
        backend.request_skip(731)
        sink = backend.open()
        assert sink.pending_skips() == {731}
        sink.mark_skipped(731, "0/1A2B", 3)
        assert sink.in_transaction
        sink.rollback()
        assert sink.pending_skips() == {731} and backend.skips() == {731: None}
        sink.mark_skipped(731, "0/1A2B", 3)
        commit(sink, "s", 0x1A2B)
        assert sink.pending_skips() == set()
        assert backend.skips() == {731: ("0/1A2B", 3)}
        backend.close(sink)

    def test_problems_are_replaced_as_a_whole(self, backend: Backend) -> None:
        sink = backend.open()
        sink.set_problems([PROBLEM, {**PROBLEM, "kind": "missing_table", "message": "no table"}])
        assert sorted(backend.problems()) == [
            ("missing_column", "no column x"),
            ("missing_table", "no table"),
        ]
        sink.set_problems([PROBLEM])
        assert backend.problems() == [("missing_column", "no column x")]
        sink.set_problems([])
        assert backend.problems() == []
        backend.close(sink)
