"""A source database whose TimeZone is not UTC: capture's replication session runs with
TimeZone=UTC anyway, so wal2json writes every timestamptz as ``...+00``, the events carry
ISO 8601 UTC, and the compiled decoder converts them itself (its fast path)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest

from cdc import decode as decoding
from cdc.capture import wal2json_options
from cdc.decode import RowChange, decode
from cdc.stream import ReplicationStream, XLogData
from config.settings import Settings
from tests.conftest import read_events

ZONE = "Asia/Kolkata"  # +05:30: off UTC by hours and minutes
AT = "2026-11-25 15:07:53.877066+00"
STAMP = re.compile(rb'"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d(?::\d\d)?)?)"')
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _not_utc(db) -> None:
    db.execute(f"ALTER DATABASE \"{db.name}\" SET TimeZone = '{ZONE}'")
    assert db.execute("SHOW TimeZone")[0][0] == ZONE  # every new session of it


@contextmanager
def _timestamptz_fallbacks() -> Iterator[list[object]]:
    """Values of timestamptz columns the compiled decoder handed back to Python."""
    seen: list[object] = []

    def convert(ctype: str, value: object) -> object:
        if ctype == "timestamp with time zone":
            seen.append(value)
        return decoding._convert(ctype, value)

    if decoding._compiled is None:
        pytest.skip("cdc._wal2json is not built (no C compiler at install)")
    decoding._compiled.setup(RowChange, convert)
    try:
        yield seen
    finally:
        decoding._compiled.setup(RowChange, decoding._convert)


def test_the_replication_session_prints_timestamps_in_utc_whatever_the_database_says(source_db):
    _not_utc(source_db)
    with source_db.connect() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (source_db.slot,))
        conn.execute("SET synchronous_commit = on")  # flushed before the peek below reads it
        conn.execute(
            "INSERT INTO users (name, email, password, created_at) VALUES ('z', 'z@x', 'p', %s)", (AT,)
        )
        # the premise: decoded in a session of this database, the value is at +05:30
        peeked = conn.execute(
            "SELECT string_agg(data, '') FROM pg_logical_slot_peek_changes(%s, NULL, NULL,"
            " 'format-version', '2', 'include-types', '1', 'include-timestamp', '1')",
            (source_db.slot,),
        ).fetchone()[0]
    assert '"2026-11-25 20:37:53.877066+05:30"' in peeked
    stream = ReplicationStream(
        source_db.dsn, source_db.slot, wal2json_options(Settings(source={"dsn": source_db.dsn}))
    )
    stream.start(0)
    messages: list[bytes] = []
    try:
        while not (messages and messages[-1].startswith(b'{"action":"C"')):
            frame = stream.read(timeout=5.0)
            assert frame is not None, "the slot stopped before the end"
            if isinstance(frame, XLogData):
                messages.append(bytes(frame.payload))
    finally:
        stream.close()
    stamps = [s for m in messages for s in STAMP.findall(m)]
    assert len(stamps) >= 4  # begin, commit, created_at, updated_at
    assert all(s.endswith(b"+00") for s in stamps), stamps
    (row,) = [m for m in messages if m.startswith(b'{"action":"I"')]
    with _timestamptz_fallbacks() as fallbacks:
        change = decode(memoryview(row))
    assert isinstance(change, RowChange)
    assert change.new["created_at"] == "2026-11-25T15:07:53.877066Z"
    assert fallbacks == []  # converted by the compiled decoder itself


def test_captured_timestamps_are_utc_when_the_source_timezone_is_not(source_db, settings, run_capture):
    _not_utc(source_db)
    with _timestamptz_fallbacks() as fallbacks:
        capture = run_capture(settings)
        capture.wait_caught_up()
        source_db.execute(
            "INSERT INTO users (name, email, password, created_at) VALUES ('z', 'z@x', 'p', %s)", AT
        )
        capture.wait_caught_up()
        capture.stop()
    (event,) = read_events(settings.outbox.path)
    record = event["data"]["record"]
    assert record["created_at"] == "2026-11-25T15:07:53.877066Z"
    for stamp in (event["timestamp"], record["updated_at"]):
        assert ISO_UTC.match(stamp), stamp
    # the commit time is the instant of updated_at's now(), not off by the zone's 5:30
    committed = datetime.fromisoformat(event["timestamp"])
    updated = datetime.fromisoformat(record["updated_at"])
    assert timedelta(0) <= committed - updated < timedelta(seconds=30)
    assert fallbacks == []
