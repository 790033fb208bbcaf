"""Backfill inside the capture loop, driven by a recorded stream (no Postgres, no
SQLite): chunks read between transactions, cut against the stream by their snapshot, so a
chunk's row never overwrites a newer streamed change; progress commits with the events."""

from __future__ import annotations

from typing import Any

from tests.fakes import Wal
from tests.unit.test_capture_loop import Rig, user


def users(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"u{i}", "email": f"u{i}@x", "password": "secret"} for i in range(1, n + 1)]


def backfill_rig(n: int, chunk: int = 2) -> Rig:
    rig = Rig(source_settings={})
    rig.source.rows["public.users"] = users(n)
    rig.outbox.request_backfill("public.users")
    rig.source.on_chunk = rig.wal.watermark  # the watermark right after the read: nothing raced it
    rig.chunk = chunk  # type: ignore[attr-defined]
    return rig


def run(rig: Rig) -> None:
    capture = rig.capture()
    capture.settings.backfill.chunk_size = rig.chunk  # type: ignore[attr-defined]
    capture._backfill.chunk_size = rig.chunk  # type: ignore[attr-defined]
    capture.run()


def last_by_user(rig: Rig) -> dict[int, tuple[str, str]]:
    last: dict[int, tuple[str, str]] = {}
    for e in rig.outbox.events:
        last[e.data["id"]] = (e.type, e.data["record"]["name"])
    return last


def test_every_existing_row_goes_out_once_as_a_read_event_without_excluded_columns() -> None:
    rig = backfill_rig(5)
    run(rig)
    events = rig.outbox.events
    assert [e.data["id"] for e in events] == [1, 2, 3, 4, 5]
    assert {e.type for e in events} == {"customer.snapshot"} and {e.op for e in events} == {"read"}
    assert all("password" not in e.data["record"] and e.data["previous"] is None for e in events)
    job = rig.outbox.backfills[0]
    assert (job["state"], job["rows_done"], job["events"], job["total"]) == ("done", 5, 5, 5)
    assert [c[1] for c in rig.source.chunks] == [None, [2], [4]]  # keyset: after the last key read


def test_a_change_the_chunk_did_not_see_wins_over_the_chunk() -> None:
    rig = backfill_rig(4, chunk=10)
    rig.source.snapshot = "900:900:"  # sees xids below 900

    def raced(label: str) -> None:
        wal: Wal = rig.wal
        # committed after the chunk's snapshot: newer than the row the chunk read
        wal.transaction(
            ("update", "public.users", {"id": 2, "name": "renamed", "email": "e", "password": "p"}), xid=950
        )
        # seen by the snapshot (it committed before it), but streamed only now
        wal.transaction(
            ("update", "public.users", {"id": 3, "name": "u3", "email": "u3@x", "password": "p"}), xid=850
        )
        wal.watermark(label)

    rig.source.on_chunk = raced
    run(rig)
    last = last_by_user(rig)
    assert last[2] == ("customer.updated", "renamed")  # the chunk's older u2 was left out
    assert last[3] == ("customer.snapshot", "u3")  # the chunk, newer or equal, came after
    assert [e.type for e in rig.outbox.events if e.data["id"] == 2] == ["customer.updated"]
    assert rig.outbox.backfills[0]["state"] == "done"


def test_an_unseen_change_the_rules_emit_nothing_for_is_read_again() -> None:
    rig = backfill_rig(3, chunk=10)
    rig.source.snapshot = "900:900:"
    rig.source.rows["public.users"][0]["name"] = "before"
    reads = []

    def raced(label: str) -> None:
        reads.append(label)
        if len(reads) == 1:  # users only emit on insert and update: a delete-free change we skip
            rig.wal.transaction(("insert", "public.noise", {"id": 1, "payload": "x"}), xid=951)
            rig.source.rows["public.users"][0]["name"] = "after"
        rig.wal.watermark(label)

    rig.source.on_chunk = raced
    run(rig)
    assert last_by_user(rig)[1] == ("customer.snapshot", "before")  # noise: not a users change
    assert len(reads) == 1


def test_a_snapshot_that_raced_a_streamed_commit_is_read_again() -> None:
    rig = backfill_rig(2, chunk=10)
    rig.outbox.request_backfill("public.users")  # a second job, read after the first
    labels: list[str] = []
    streamed: list[int] = []

    def read(label: str) -> None:
        labels.append(label)
        if len(labels) == 1:
            streamed.append(rig.wal.transaction(user(7)).xid)  # streamed before the next chunk...
        elif len(labels) == 2:  # ...yet still running for its snapshot
            xid = streamed[0]
            rig.source.snapshot = f"{xid}:{xid + 5}:{xid}"
            rig.clock.advance(1.0)  # time passes; this read is dropped and no watermark is awaited
            rig.wal.pause()
            return
        else:
            rig.source.snapshot = f"{streamed[0] + 5}:{streamed[0] + 5}:"
        rig.wal.watermark(label)

    rig.source.on_chunk = read
    run(rig)
    assert len(labels) == 3
    assert [e.data["id"] for e in rig.outbox.events if e.op == "read"] == [1, 2, 1, 2]
    assert [j["state"] for j in rig.outbox.backfills] == ["done", "done"]


def test_a_cancel_stops_the_job_between_chunks() -> None:
    rig = backfill_rig(6, chunk=2)

    def read(label: str) -> None:
        rig.outbox.backfills[0]["cancel_requested_at"] = 1.0
        rig.clock.advance(2.0)  # capture looks at its jobs again every second
        rig.wal.watermark(label)
        rig.wal.keepalive()
        rig.wal.pause()

    rig.source.on_chunk = read
    run(rig)
    assert rig.outbox.backfills[0]["state"] == "cancelled"
    assert len([e for e in rig.outbox.events if e.op == "read"]) <= 2


def test_after_a_crash_the_job_goes_on_after_the_last_committed_chunk() -> None:
    rig = backfill_rig(5, chunk=2)
    calls = []

    def read(label: str) -> None:
        calls.append(label)
        if len(calls) == 2:
            rig.wal.disconnect()  # the second chunk's watermark never comes in this session
        rig.wal.watermark(label)

    rig.source.on_chunk = read
    run(rig)
    ids = [e.data["id"] for e in rig.outbox.events if e.op == "read"]
    assert ids == [1, 2, 3, 4, 5]  # the chunk lost with the session was read again, once
    assert rig.outbox.backfills[0]["state"] == "done"


def test_a_snapshot_that_does_not_see_a_newer_streamed_commit_is_read_again() -> None:
    """A transaction past the snapshot's xmax, streamed before the chunk (its commit record
    flushed, not yet visible: synchronous replication makes that window long)."""
    rig = backfill_rig(2, chunk=10)
    rig.outbox.request_backfill("public.users")  # a second job, read after 960 streamed
    labels: list[str] = []
    # (the fake source reads a chunk's rows before calling on_chunk, its snapshot after)

    def read(label: str) -> None:
        labels.append(label)
        if len(labels) == 1:  # the first job; 960, which its snapshot does not see, makes user 1 NEW
            rig.source.snapshot = "950:950:"
            new = {"id": 1, "name": "NEW", "email": "e", "password": "p"}
            rig.wal.transaction(("update", "public.users", new), xid=960)
            rig.wal.watermark(label)
        elif len(labels) == 2:  # 960 streamed, still not visible: this read sees the old u1
            rig.source.rows["public.users"][0]["name"] = "NEW"  # (what the next read sees)
            rig.clock.advance(1.0)
            rig.wal.pause()
        else:  # read again once 960 is visible
            rig.source.snapshot = "961:961:"
            rig.wal.watermark(label)

    rig.source.on_chunk = read
    run(rig)
    assert len(labels) == 3
    assert last_by_user(rig)[1] == ("customer.snapshot", "NEW")  # never the old u1 after NEW
    assert [(e.type, e.data["record"]["name"]) for e in rig.outbox.events if e.data["id"] == 1] == [
        ("customer.updated", "NEW"),
        ("customer.snapshot", "NEW"),
    ]


def test_a_truncate_the_chunk_did_not_see_makes_it_read_again_whole() -> None:
    rig = backfill_rig(3, chunk=10)
    rig.source.snapshot = "900:900:"
    labels: list[str] = []

    def read(label: str) -> None:
        labels.append(label)
        if len(labels) == 1:
            rig.wal.truncate("public.users", xid=950)  # of one partition, say: which rows is not known
        else:
            rig.source.snapshot = "951:951:"  # the read again sees it
        rig.wal.watermark(label)

    rig.source.on_chunk = read
    run(rig)
    assert len(labels) == 2  # the first chunk sent nothing and did not move on
    assert [e.data["id"] for e in rig.outbox.events if e.op == "read"] == [1, 2, 3]
    assert rig.source.chunks[0][1] is None and rig.source.chunks[1][1] is None


def test_a_rate_reads_small_chunks_and_a_cancel_is_seen_while_it_waits() -> None:
    rig = backfill_rig(50, chunk=10)
    rig.outbox.backfills[0]["rate"] = 2.0  # two rows a second: chunks of two, a second apart
    reads = 0

    def read(label: str) -> None:
        nonlocal reads
        reads += 1
        rig.wal.watermark(label)
        if reads == 2:
            rig.outbox.backfills[0]["cancel_requested_at"] = 1.0
        for _ in range(40):
            rig.wal.pause()  # the stream idles while the rate holds the next chunk back

    rig.source.on_chunk = read
    run(rig)
    assert [c[2] for c in rig.source.chunks] == [2, 2]  # never more than the rate allows at once
    assert rig.outbox.backfills[0]["state"] == "cancelled"
    assert len([e for e in rig.outbox.events if e.op == "read"]) == 4


def test_a_watermark_the_stream_went_past_without_is_given_up_and_its_chunk_read_again() -> None:
    rig = backfill_rig(2, chunk=10)
    labels: list[str] = []

    def read(label: str) -> None:
        labels.append(label)
        if len(labels) == 1:
            rig.source.passed = rig.wal.lsn  # the watermark never comes: a later commit does
            rig.wal.transaction(("insert", "public.noise", {"id": 1, "payload": "x"}))
            rig.clock.advance(2.0)
            rig.wal.pause()
            return
        rig.source.passed = 1 << 62
        rig.wal.watermark(label)

    rig.source.on_chunk = read
    run(rig)
    assert len(labels) == 2
    assert [e.data["id"] for e in rig.outbox.events if e.op == "read"] == [1, 2]


def test_a_watermark_that_comes_back_late_moves_the_job_on_once() -> None:
    """Capture looks at its jobs again every second, also while a chunk waits for its
    watermark; a watermark later than that must still move the job it looks at on
    (reproduced first: the next chunk started where the one before had, and its rows went
    out twice)."""
    rig = backfill_rig(4, chunk=2)
    reads: list[str] = []

    def late(label: str) -> None:
        reads.append(label)
        rig.wal.transaction(("insert", "public.noise", {"id": len(reads), "payload": "x"}))
        rig.clock.advance(1.5)  # the watermark comes back after capture looked at its jobs again
        rig.wal.transaction(("insert", "public.noise", {"id": 100 + len(reads), "payload": "x"}))
        rig.wal.watermark(label)

    rig.source.on_chunk = late
    run(rig)
    assert [c[1] for c in rig.source.chunks] == [None, [2], [4]]
    assert [e.data["id"] for e in rig.outbox.events if e.op == "read"] == [1, 2, 3, 4]
