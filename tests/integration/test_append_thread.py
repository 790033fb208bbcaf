"""Capture's events inserted on a native thread (outbox/append.py): the rows stored are the
ones executemany stores, a failed insert surfaces at the commit as an outbox error (with
sqlite3's message) and leaves nothing behind, and what the compiled module does not take
goes the old way."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from outbox import append, store
from outbox.store import OutboxError, Q, Route, Router
from outbox.writer import OutboxWriter
from tests.waiting import wait_until

VALUES: list[Any] = [
    "",
    "plain",
    "é ü ß",
    "😀 outside the BMP",
    "x" * 100_000,
    None,
    0,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.0,
    1e308,
]


def _rows(n: int) -> list[tuple[Any, ...]]:
    """Rows of eleven columns, each taking every one of VALUES in turn."""
    return [tuple(VALUES[(i + c) % len(VALUES)] for c in range(11)) for i in range(n)]


def _stored(path: Path, table: str = "events") -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()


def _durable(writer: OutboxWriter, number: int) -> None:
    """Wait until the writer's commit ``number`` is durable (its thread finishes it)."""
    wait_until(lambda: writer.commits_durable >= number, 10, what=f"commit {number} durable")


def _writer(path: Path, on_thread: bool = True) -> OutboxWriter:
    writer = OutboxWriter(
        store.open_outbox(path), Router([Route("ct2", ("*",))]), appends_on_thread=on_thread
    )
    assert writer.appends_on_thread is on_thread
    return writer


TABLE = "CREATE TABLE t (" + ", ".join(f"c{n}" for n in range(11)) + ")"
INSERT = "INSERT INTO t VALUES (" + ", ".join("?" * 11) + ")"


def test_the_rows_stored_are_the_ones_executemany_stores(tmp_path: Path) -> None:
    rows = _rows(2_500)
    threaded = store.open_outbox(tmp_path / "a.db")
    threaded.execute(TABLE)
    appender = append.appender_for(threaded, INSERT)
    assert appender is not None
    threaded.execute("BEGIN IMMEDIATE")
    for at in range(0, len(rows), 1000):
        appender.append(rows[at : at + 1000])  # queued: inserted while this goes on
    assert append.settle(appender) == len(rows)
    threaded.execute("COMMIT")
    appender.close()
    threaded.close()
    plain = store.open_outbox(tmp_path / "b.db")
    plain.execute(TABLE)
    with store.transaction(plain):
        plain.executemany(INSERT, rows)
    plain.close()
    stored = _stored(tmp_path / "a.db", "t")
    assert stored == _stored(tmp_path / "b.db", "t")
    assert len(stored) == 2_500
    assert {type(v) for row in stored for v in row} == {str, int, float, type(None)}


def test_a_failed_insert_is_raised_at_the_commit_and_nothing_of_the_group_stays(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    writer.add(
        "customer.created", "customer", 1, {"n": 1}, "2026-01-01T00:00:00Z", "customers", "insert", "0/1", 7
    )
    _durable(writer, writer.commit("slot", 100))
    for n in range(2500):  # the second chunk holds the bad row; the third comes after it
        _add(writer, n, None if n == 1200 else "customer")
    with pytest.raises(OutboxError, match=r"NOT NULL constraint failed: events\.object"):
        writer.commit("slot", 200)
    writer.rollback()
    assert [row[0] for row in _stored(path)] == [1]
    assert writer.checkpoint("slot") == 100
    # the writer goes on: the next group commits whole, its ids after the last committed one
    writer.add("customer.created", "customer", 2, {"n": 2}, "2026-01-01T00:00:02Z", None, None, None, None)
    assert writer.commit("slot", 300) == 2  # (the failed one's number is given again)
    _durable(writer, 2)
    assert writer.durable_lsn == 300
    assert [row[0] for row in _stored(path)] == [1, 2]
    assert writer.last_event_id == 2
    writer.close()


def test_a_value_it_does_not_take_is_refused_whole_and_the_writer_uses_executemany(tmp_path: Path) -> None:
    conn = store.open_outbox(tmp_path / "outbox.db")
    appender = append.appender_for(conn, Q["insert_event"])
    assert appender is not None
    good = (
        "customer.created",
        "customer",
        "1",
        "2026-01-01T00:00:00Z",
        "{}",
        None,
        None,
        None,
        1,
        1.0,
        0,
        None,
    )
    with pytest.raises(TypeError, match="past 64 bits"):
        appender.append([good, (*good[:8], 2**64, *good[9:])])
    with pytest.raises(TypeError, match="bytes is not taken"):
        appender.append([(*good[:1], b"customer", *good[2:])])
    with pytest.raises(TypeError, match="not a tuple of 12 values"):
        appender.append([good[:11]])
    assert append.settle(appender) == 0  # nothing was queued
    assert _stored(tmp_path / "outbox.db") == []
    appender.close()
    conn.close()
    writer = _writer(tmp_path / "outbox.db")
    writer.add("customer.created", "customer", 1, {"n": 1}, "2026-01-01T00:00:00Z", None, None, None, 2**40)
    writer.add("customer.created", "customer", 2, {"n": 2}, "2026-01-01T00:00:00Z", None, None, None, 2**64)
    with pytest.raises(OverflowError):  # what executemany says of it, the same either way
        writer.commit("slot", 1)
    writer.rollback()
    assert _stored(tmp_path / "outbox.db") == []
    writer.close()


def test_it_is_off_when_asked_and_for_a_database_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = store.open_outbox(tmp_path / "outbox.db")
    monkeypatch.setenv("CT1_CDC_APPEND_THREAD", "off")
    assert append.appender_for(conn, Q["insert_event"]) is None
    monkeypatch.delenv("CT1_CDC_APPEND_THREAD")
    memory = sqlite3.connect(":memory:")
    memory.execute("CREATE TABLE t (a)")
    assert append.appender_for(memory, "INSERT INTO t VALUES (?)") is None
    conn.close()


def test_a_huge_transaction_never_piles_up_queued_chunks(tmp_path: Path) -> None:
    conn = store.open_outbox(tmp_path / "outbox.db")
    conn.execute(TABLE)
    appender = append.appender_for(conn, INSERT)
    assert appender is not None
    conn.execute("BEGIN IMMEDIATE")
    rows = [(n, "a row", 1.5, None, "é", n, n, n, n, n, n) for n in range(200)]
    most = 0
    for _ in range(200):  # far faster to queue than to insert: append waits for room
        appender.append(rows)
        most = max(most, appender.queued())
    assert 1 <= most <= 5  # MAX_QUEUED, and the one appended last
    assert append.settle(appender) == 200 * 200
    assert appender.queued() == 0
    conn.execute("COMMIT")
    appender.close()
    conn.close()
    assert len(_stored(tmp_path / "outbox.db", "t")) == 40_000


# -- faults a review found in the thread's group commits, reproduced first ------------------


def _add(writer: OutboxWriter, n: int, object: str | None = "customer") -> None:
    """One customer.created event; ``object=None`` makes a row the thread fails to insert
    (events.object is NOT NULL)."""
    writer.add("customer.created", object, n, {"n": n}, "2026-01-01T00:00:00Z", None, None, None, None)  # type: ignore[arg-type]


def test_a_read_while_the_thread_waits_for_another_writers_lock_does_not_hold_up_the_process(
    tmp_path: Path,
) -> None:
    """The thread's BEGIN waits (holding the connection's mutex) for another writer of the
    file; a read of capture's (the shadow) must wait without the GIL, or the other writer
    never gets the GIL to commit, and the BEGIN fails on the busy timeout."""
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    _add(writer, 0)
    _durable(writer, writer.commit("slot", 1, wait=False))
    assert writer.shadow_get("public.orders", "0") is None  # (its statement cached: bound holding the GIL)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO derived_state (kind, key, value) VALUES ('test', 'k', '1')")

    def release() -> None:
        time.sleep(0.5)  # (the GIL is free while it sleeps; it needs it back to commit)
        other.execute("COMMIT")

    releasing = threading.Thread(target=release)
    releasing.start()
    for n in range(1, 1001):  # a chunk: the thread's BEGIN, waiting for the other's lock
        _add(writer, n)
    assert writer.shadow_get("public.orders", "1") is None
    releasing.join()
    _durable(writer, writer.commit("slot", 2, wait=False))
    assert len(_stored(path)) == 1001
    writer.close()
    other.close()


def test_a_begin_that_failed_is_rolled_back_without_a_new_error_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    _add(writer, 0)
    _durable(writer, writer.commit("slot", 1, wait=False))
    writer.conn.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    for n in range(1, 1001):
        _add(writer, n)
    with pytest.raises(OutboxError, match="locked"):
        writer.commit("slot", 2, wait=False)
    writer.rollback()  # (no transaction is open: the BEGIN failed)
    other.execute("COMMIT")
    other.close()
    _add(writer, 1001)
    _durable(writer, writer.commit("slot", 3, wait=False))
    assert [row[0] for row in _stored(path)] == [1, 2]
    assert writer.checkpoint("slot") == 3
    writer.close()


def test_a_commit_done_before_a_later_failure_stays_durable(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    _add(writer, 1)
    first = writer.commit("slot", 100, wait=False)  # (not looked at before the failure)
    for n in range(2, 1002):
        _add(writer, n, None if n == 500 else "customer")
    with pytest.raises(OutboxError, match="NOT NULL"):
        writer.commit("slot", 200, wait=False)
    assert writer.commits_durable == first
    assert writer.durable_lsn == 100
    writer.rollback()
    assert [row[0] for row in _stored(path)] == [1]
    writer.close()


def test_the_last_event_id_stays_when_the_thread_committed_rows_it_did_not_insert(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    writer.add("ct1.gap", "gap", None, {"n": 1}, "2026-01-01T00:00:00Z", None, None, None, None)
    writer.add("a.type.new.to.the.writer", "x", 1, {"n": 1}, "2026-01-01T00:00:00Z", None, None, None, None)
    number = writer.commit("slot", 1, wait=False)  # (rows of types routed now: executemany)
    _durable(writer, number)
    assert writer.checkpoint("slot") == 1
    assert writer.last_event_id == 2
    writer.close()


def test_a_commit_that_waits_is_durable_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    writer = _writer(path)
    _add(writer, 1)
    number = writer.commit("slot", 7)  # (the default: commands like `ct1-cdc slot recover`)
    assert writer.commits_durable == number
    assert writer.durable_lsn == 7
    assert len(_stored(path)) == 1
    writer.close()
