"""Capture's writer leaves WAL checkpoints to the checkpointer thread: its commits never
copy the WAL back, yet the WAL file stays small and every event reaches the main file."""

from __future__ import annotations

import sqlite3
import time

from outbox import store
from outbox.checkpointer import Checkpointer
from outbox.store import Route, Router
from outbox.writer import OutboxWriter

PAD = "x" * 2000  # ~2 KB per event: 1,000 events are ~500 pages of WAL


def _append(writer: OutboxWriter, start: int, n: int) -> None:
    for i in range(start, start + n):
        writer.add(
            "order.created",
            "order",
            i,
            {"object": "order", "id": i, "record": {"id": i, "pad": PAD}, "previous": None},
            "2026-11-25T00:00:00.000000Z",
            "public.orders",
            "insert",
            "0/1",
            1,
        )


def _wait_for_checkpoints(checkpointer: Checkpointer, rounds: int) -> None:
    target = checkpointer.checkpoints + rounds
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints < target:
        assert time.monotonic() < deadline, "the checkpointer stopped checkpointing"
        time.sleep(0.005)


def _wal_bytes(path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_checkpoints_run_beside_the_writer_and_keep_the_wal_small(tmp_path):
    path = tmp_path / "outbox.db"
    checkpointer = Checkpointer(path, interval=0.01)
    writer = OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))]), checkpointer=checkpointer)
    assert writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    batches, per = 20, 1000
    largest_wal = 0
    try:
        for b in range(batches):
            _append(writer, b * per, per)
            writer.commit("test", b + 1)
            _wait_for_checkpoints(checkpointer, 2)
            largest_wal = max(largest_wal, _wal_bytes(path))
        # the WAL was copied back and reused: it never held more than a few batches,
        # although 20 batches of ~2 MB went through it
        total = batches * per * len(PAD)
        assert checkpointer.checkpoints >= batches
        assert largest_wal < total / 4, (largest_wal, total)
        # stopping runs a last checkpoint: then the main file alone holds every event
        checkpointer.stop()
        main_only = tmp_path / "copy.db"
        main_only.write_bytes(path.read_bytes())
        with sqlite3.connect(main_only) as conn:
            copied = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        assert copied == batches * per
    finally:
        writer.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == batches * per
    with store.connect(path, readonly=True) as conn:  # each event due to the endpoint
        assert store.stats(conn)["deliveries"] == {"ct2": {"pending": batches * per}}


def test_without_a_checkpointer_sqlite_checkpoints_as_usual(tmp_path):
    path = tmp_path / "outbox.db"
    writer = OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))]))
    try:
        assert writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        writer.close()


def test_a_huge_transaction_does_not_leave_a_huge_wal_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "WAL_SIZE_LIMIT", 4 * 1024 * 1024)
    path = tmp_path / "outbox.db"
    checkpointer = Checkpointer(path, interval=0.01)
    writer = OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))]), checkpointer=checkpointer)
    try:
        _append(writer, 0, 10_000)  # one source transaction of ~20 MB: one SQLite transaction
        writer.commit("test", 1)
        assert _wal_bytes(path) > 16 * 1024 * 1024
        _wait_for_checkpoints(checkpointer, 2)
        _append(writer, 10_000, 10)  # the next commit starts the WAL over, cut to the limit
        writer.commit("test", 2)
        assert _wal_bytes(path) <= 4 * 1024 * 1024
    finally:
        writer.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 10_010


def test_a_failing_checkpointer_keeps_trying_and_recovers(tmp_path):
    blocker = tmp_path / "var"
    blocker.write_text("a file where the outbox folder should be")
    checkpointer = Checkpointer(blocker / "outbox.db", interval=0.01)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while checkpointer.failures < 3:
            assert time.monotonic() < deadline, "no failed round reported"
            time.sleep(0.005)
        assert checkpointer.checkpoints == 0
        blocker.unlink()  # the folder can now be made: the next round succeeds
        _wait_for_checkpoints(checkpointer, 1)
    finally:
        checkpointer.stop()
    assert (blocker / "outbox.db").exists()
