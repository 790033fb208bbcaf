"""Capture's reads of a real replication stream many frames a call (``cdc._frames``): the
same messages, in the same order, as a frame at a time through psycopg; batches end at a
transaction's commit; a server ending the stream is named; the reader can be turned off."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
import pytest

from cdc import native_read
from cdc.capture import wal2json_options
from cdc.decode import Begin, Commit, Decoded, Message, RowChange, decode
from cdc.source import HEARTBEAT_PREFIX
from cdc.stream import Keepalive, ReplicationStream, XLogData
from common.errors import SourceUnavailable
from config.settings import Settings

END = HEARTBEAT_PREFIX  # (a prefix the stream carries) marks the end of what a test wrote


@pytest.fixture
def native() -> Iterator[None]:
    """The reader set up afresh, with the real libpq (a unit test may have set it up with
    one of its own)."""
    native_read.load.cache_clear()
    yield
    native_read.load.cache_clear()


def write_changes(db) -> None:
    db.execute(
        "INSERT INTO users (name, email, password) SELECT 'u' || i, 'u' || i || '@x', 'p'"
        " FROM generate_series(1, 300) i"
    )  # one transaction of 300 rows: more than one batch
    db.execute("UPDATE users SET name = 'ünïcödé ' || repeat('x', 100000) WHERE id = 1")
    db.execute("DELETE FROM users WHERE id = 2")
    with db.connect() as conn:
        conn.execute("CREATE TABLE wide (id int PRIMARY KEY, n numeric, j jsonb, a text[])")
        conn.execute(
            "INSERT INTO wide VALUES (1, 123456789012345678901234567890.123456789,"
            " '{\"big\": 123456789012345678901234567890}', ARRAY['a', 'b'])"
        )
        conn.execute("SELECT pg_logical_emit_message(false, %s, 'end')", (END,))


def messages(stream: ReplicationStream, *, many: bool) -> tuple[list[Decoded], list[list[object]]]:
    """Every message up to the END marker, decoded, and (with ``many``) each read's items."""
    got: list[Decoded] = []
    batches: list[list[object]] = []
    while not (got and isinstance(got[-1], Message) and got[-1].content == "end"):
        if many:
            items: list[object] = list(stream.read_many(timeout=5.0))
        else:
            one = stream.read(timeout=5.0)
            items = [] if one is None else [one]
        assert items, "the slot stopped before the end"
        batches.append(items)
        for item in items:
            if isinstance(item, (RowChange, Begin, Commit)):
                got.append(item)
            elif isinstance(item, XLogData):
                got.append(decode(item.payload))
            else:
                assert isinstance(item, Keepalive)
    return got, batches


def stream_all(db, *, many: bool) -> tuple[list[Decoded], list[list[object]], bool]:
    """A session's messages up to the END marker (confirming nothing), its reads' items,
    and whether the native reader read them."""
    stream = open_stream(db)
    try:
        return (*messages(stream, many=many), stream._reader is not None)
    finally:
        stream.close()


def open_stream(db) -> ReplicationStream:
    stream = ReplicationStream(db.dsn, db.slot, wal2json_options(Settings(source={"dsn": db.dsn})))
    stream.start(0)
    return stream


def test_many_frames_a_read_give_what_a_frame_at_a_time_gives(source_db, native, monkeypatch):
    source_db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", source_db.slot)
    write_changes(source_db)
    many, batches, native = stream_all(source_db, many=True)
    if not native:
        pytest.skip("cdc._frames is not built (no C compiler at install)")
    monkeypatch.setenv("CT1_CDC_NATIVE_READ", "off")  # (nothing confirmed: the same changes again)
    one, _, native = stream_all(source_db, many=False)
    assert not native
    assert many == one
    rows = [m for m in many if isinstance(m, RowChange)]
    assert len(rows) == 300 + 1 + 1 + 1
    assert rows[300].new["name"].startswith("ünïcödé x") and len(rows[300].new["name"]) == 100008
    assert str(rows[-1].new["n"]) == "123456789012345678901234567890.123456789"
    # a row the compiled decoder took came decoded from the reader, many to a read
    assert any(sum(isinstance(i, RowChange) for i in b) > 1 for b in batches)
    # and each read stops at a transaction's commit: nothing follows a commit, or a frame
    # that is not a row change or a begin
    for batch in batches:
        assert all(isinstance(i, (RowChange, Begin)) for i in batch[:-1]), batch
    assert sum(isinstance(m, Commit) for m in many) == 5  # (the four writes, and the table made)
    # a transaction's edges came decoded too, a small transaction whole in one read
    assert any(isinstance(b[0], Begin) and isinstance(b[-1], Commit) for b in batches)


def test_a_stream_the_server_ends_is_named_and_a_new_session_goes_on(source_db, native):
    source_db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", source_db.slot)
    stream = open_stream(source_db)
    try:
        if stream._reader is None:
            pytest.skip("cdc._frames is not built (no C compiler at install)")
        stream.read_many(timeout=0.2)  # (streaming)
        write_changes(source_db)
        time.sleep(1.0)  # (its frames wait in the socket)
        source_db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
            source_db.slot,
        )
        time.sleep(0.5)
        with contextlib.suppress(psycopg.OperationalError):  # (once it reads the socket's end)
            for _ in range(50):  # libpq holds the rows, then the server's error: the reader meets both
                stream._pg.consume_input()

        taken: list[object] = []
        with pytest.raises(SourceUnavailable, match=r"replication stream ended: .*administrator command"):
            for _ in range(100):
                taken += stream.read_many(timeout=0.1)
        assert sum(isinstance(i, RowChange) for i in taken) >= 300  # (the rows came first)
    finally:
        stream.close()
    got, _, _ = stream_all(source_db, many=True)
    assert sum(isinstance(m, RowChange) for m in got) == 303  # nothing confirmed: all again


def test_the_reader_turned_off_reads_a_frame_at_a_time(source_db, native, monkeypatch):
    monkeypatch.setenv("CT1_CDC_NATIVE_READ", "off")
    source_db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", source_db.slot)
    write_changes(source_db)
    got, batches, native = stream_all(source_db, many=True)
    assert not native
    assert all(len(b) == 1 for b in batches)
    assert sum(isinstance(m, RowChange) for m in got) == 303
